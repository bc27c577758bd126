package iddoc

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"strings"
	"time"

	"github.com/smallstep/pkcs7"
)

// Signer plays AWS in tests: a self-signed certificate and its key, which sign identity
// documents the way IMDS serves them. Give CertPEM to the intake as its AWS certificate.
type Signer struct {
	Cert    *x509.Certificate
	Key     crypto.PrivateKey
	CertPEM []byte
}

// NewSigner makes a fresh RSA-2048 signing certificate, valid for a day.
func NewSigner() (*Signer, error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, fmt.Errorf("generate signing key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, fmt.Errorf("generate serial: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			Country: []string{"US"}, Province: []string{"Washington State"}, Locality: []string{"Seattle"},
			Organization: []string{"Amazon Web Services LLC (imdsguard test)"},
		},
		NotBefore: now.Add(-time.Hour),
		NotAfter:  now.Add(24 * time.Hour),
		KeyUsage:  x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("create signing certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse signing certificate: %w", err)
	}
	return &Signer{Cert: cert, Key: key, CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// Sign signs doc as s.
func (s *Signer) Sign(doc []byte) (string, error) { return Sign(doc, s.Cert, s.Key) }

// Sign returns what IMDS serves at /latest/dynamic/instance-identity/pkcs7 for doc: base64
// (64 columns, no PEM header) of a PKCS#7 SignedData that carries doc as its content,
// signed with SHA-256 and key. Unlike AWS's, the signature also carries cert; Verify
// ignores carried certificates either way.
func Sign(doc []byte, cert *x509.Certificate, key crypto.PrivateKey) (string, error) {
	sd, err := pkcs7.NewSignedData(doc)
	if err != nil {
		return "", fmt.Errorf("start signed data: %w", err)
	}
	sd.SetDigestAlgorithm(pkcs7.OIDDigestAlgorithmSHA256)
	if err := sd.AddSigner(cert, key, pkcs7.SignerInfoConfig{}); err != nil {
		return "", fmt.Errorf("add signer: %w", err)
	}
	der, err := sd.Finish()
	if err != nil {
		return "", fmt.Errorf("finish signed data: %w", err)
	}
	b64 := base64.StdEncoding.EncodeToString(der)
	var b strings.Builder
	for len(b64) > 64 {
		b.WriteString(b64[:64])
		b.WriteByte('\n')
		b64 = b64[64:]
	}
	b.WriteString(b64)
	return b.String(), nil
}
