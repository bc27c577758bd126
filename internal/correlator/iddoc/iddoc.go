// Package iddoc checks EC2 instance identity documents: the JSON that IMDS serves at
// /latest/dynamic/instance-identity/document, and the PKCS#7 SignedData over it that it
// serves at /latest/dynamic/instance-identity/pkcs7. The correlator's intake uses Verify
// to learn which instance sent a batch; tests use Sign to play AWS.
package iddoc

import (
	"bytes"
	"crypto"
	"crypto/dsa" //nolint:staticcheck // deprecated, but AWS signs the pkcs7 document with DSA-SHA1
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/subtle"
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"strings"

	"github.com/smallstep/pkcs7"
)

// Document is the part of the instance identity document the correlator uses.
type Document struct {
	AccountID        string `json:"accountId"`
	InstanceID       string `json:"instanceId"`
	Region           string `json:"region"`
	AvailabilityZone string `json:"availabilityZone"`
	PrivateIP        string `json:"privateIp"`
	ImageID          string `json:"imageId"`
	InstanceType     string `json:"instanceType"`
	Architecture     string `json:"architecture"`
	PendingTime      string `json:"pendingTime"`
	Version          string `json:"version"`
}

// ErrSignature is wrapped by every Verify error that means "not signed by a configured
// certificate" (as opposed to a document that cannot be read at all).
var ErrSignature = errors.New("signature does not verify")

// maxPKCS7 bounds the decoded signature; AWS's is about 1 KiB.
const maxPKCS7 = 64 << 10

// Verify checks that pkcs7B64 (the body of IMDS's pkcs7 answer: base64 of a DER or BER
// PKCS#7 SignedData, newlines allowed) was made by one of certs over doc, and returns the
// document. The signed content must equal doc byte for byte; a detached signature is
// checked over doc. Only the configured certificates are trusted: certificates carried
// in the signature are ignored.
func Verify(doc []byte, pkcs7B64 string, certs []*x509.Certificate) (Document, error) {
	if len(certs) == 0 {
		return Document{}, fmt.Errorf("%w: no aws certificates configured", ErrSignature)
	}
	der, err := decodeBase64(pkcs7B64)
	if err != nil {
		return Document{}, fmt.Errorf("%w: decode pkcs7: %v", ErrSignature, err)
	}
	p7, err := pkcs7.Parse(der)
	if err != nil {
		return Document{}, fmt.Errorf("%w: parse pkcs7: %v", ErrSignature, err)
	}
	content := p7.Content
	if len(content) == 0 {
		content = doc // detached
	}
	if !bytes.Equal(content, doc) {
		return Document{}, fmt.Errorf("%w: signed content differs from the document", ErrSignature)
	}
	if len(p7.Signers) != 1 {
		return Document{}, fmt.Errorf("%w: want one signer, got %d", ErrSignature, len(p7.Signers))
	}
	s := p7.Signers[0]
	var cert *x509.Certificate
	for _, c := range certs {
		if c.SerialNumber.Cmp(s.IssuerAndSerialNumber.SerialNumber) == 0 && bytes.Equal(c.RawIssuer, s.IssuerAndSerialNumber.IssuerName.FullBytes) {
			cert = c
			break
		}
	}
	if cert == nil {
		return Document{}, fmt.Errorf("%w: signer (serial %s) is none of the configured certificates", ErrSignature, s.IssuerAndSerialNumber.SerialNumber)
	}
	h, err := hashOf(s.DigestAlgorithm.Algorithm)
	if err != nil {
		return Document{}, fmt.Errorf("%w: %v", ErrSignature, err)
	}
	signed := content
	if len(s.AuthenticatedAttributes) > 0 {
		var digest []byte
		attrs := make([]attribute, 0, len(s.AuthenticatedAttributes))
		for _, a := range s.AuthenticatedAttributes {
			attrs = append(attrs, attribute{Type: a.Type, Value: a.Value})
			if a.Type.Equal(oidMessageDigest) {
				if _, err := asn1.Unmarshal(a.Value.Bytes, &digest); err != nil {
					return Document{}, fmt.Errorf("%w: decode message digest: %v", ErrSignature, err)
				}
			}
		}
		if digest == nil {
			return Document{}, fmt.Errorf("%w: signed attributes without a message digest", ErrSignature)
		}
		sum := h.New()
		sum.Write(content)
		if subtle.ConstantTimeCompare(sum.Sum(nil), digest) != 1 {
			return Document{}, fmt.Errorf("%w: message digest differs from the document's", ErrSignature)
		}
		if signed, err = marshalAttributes(attrs); err != nil {
			return Document{}, fmt.Errorf("%w: encode signed attributes: %v", ErrSignature, err)
		}
	}
	if err := checkSignature(cert.PublicKey, h, signed, s.EncryptedDigest); err != nil {
		return Document{}, fmt.Errorf("%w: %v", ErrSignature, err)
	}
	return Parse(doc)
}

// Parse decodes a document without checking anything but its shape.
func Parse(doc []byte) (Document, error) {
	var d Document
	if err := json.Unmarshal(doc, &d); err != nil {
		return Document{}, fmt.Errorf("decode identity document: %w", err)
	}
	if d.AccountID == "" || d.InstanceID == "" {
		return Document{}, errors.New("decode identity document: no accountId or instanceId")
	}
	return d, nil
}

var oidMessageDigest = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 9, 4}

type attribute struct {
	Type  asn1.ObjectIdentifier
	Value asn1.RawValue `asn1:"set"`
}

// marshalAttributes encodes signed attributes as the SET OF that the signature covers.
func marshalAttributes(attrs []attribute) ([]byte, error) {
	enc, err := asn1.Marshal(struct {
		A []attribute `asn1:"set"`
	}{A: attrs})
	if err != nil {
		return nil, err
	}
	var raw asn1.RawValue
	if _, err := asn1.Unmarshal(enc, &raw); err != nil {
		return nil, err
	}
	return raw.Bytes, nil
}

func hashOf(oid asn1.ObjectIdentifier) (crypto.Hash, error) {
	switch {
	case oid.Equal(pkcs7.OIDDigestAlgorithmSHA1), oid.Equal(pkcs7.OIDDigestAlgorithmDSASHA1):
		return crypto.SHA1, nil
	case oid.Equal(pkcs7.OIDDigestAlgorithmSHA256):
		return crypto.SHA256, nil
	case oid.Equal(pkcs7.OIDDigestAlgorithmSHA384):
		return crypto.SHA384, nil
	case oid.Equal(pkcs7.OIDDigestAlgorithmSHA512):
		return crypto.SHA512, nil
	}
	return 0, fmt.Errorf("unsupported digest algorithm %s", oid)
}

// checkSignature verifies sig over data with pub. DSA is checked here because
// crypto/x509 no longer does, and AWS's pkcs7 documents are DSA-SHA1.
func checkSignature(pub any, h crypto.Hash, data, sig []byte) error {
	d := h.New()
	d.Write(data)
	sum := d.Sum(nil)
	switch k := pub.(type) {
	case *rsa.PublicKey:
		return rsa.VerifyPKCS1v15(k, h, sum, sig)
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(k, sum, sig) {
			return errors.New("ecdsa signature mismatch")
		}
		return nil
	case *dsa.PublicKey:
		var rs struct{ R, S *big.Int }
		if rest, err := asn1.Unmarshal(sig, &rs); err != nil || len(rest) > 0 {
			return errors.New("malformed dsa signature")
		}
		// DSA signs the leftmost bits of the digest, as many as Q has.
		if n := (k.Q.BitLen() + 7) / 8; len(sum) > n {
			sum = sum[:n]
		}
		if !dsa.Verify(k, sum, rs.R, rs.S) {
			return errors.New("dsa signature mismatch")
		}
		return nil
	}
	return fmt.Errorf("unsupported public key %T", pub)
}

func decodeBase64(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	if b, _ := pem.Decode([]byte(s)); b != nil {
		return b.Bytes, nil
	}
	s = strings.Map(func(r rune) rune {
		if r == '\n' || r == '\r' || r == ' ' || r == '\t' {
			return -1
		}
		return r
	}, s)
	if len(s) > maxPKCS7*4/3+4 {
		return nil, errors.New("too large")
	}
	return base64.StdEncoding.DecodeString(s)
}

// ParseCertificates reads every CERTIFICATE block of PEM data.
func ParseCertificates(data []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse certificate: %w", err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no PEM CERTIFICATE block")
	}
	return out, nil
}

// LoadCertificates reads the PEM files AWS publishes for a region (or several).
func LoadCertificates(paths ...string) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("read aws certificate: %w", err)
		}
		cs, err := ParseCertificates(data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		out = append(out, cs...)
	}
	return out, nil
}
