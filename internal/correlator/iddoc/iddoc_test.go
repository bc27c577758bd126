package iddoc

import (
	"crypto/x509"
	"encoding/base64"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/smallstep/pkcs7"
)

const testDoc = `{
	"accountId": "123456789012",
	"architecture": "x86_64",
	"availabilityZone": "us-east-1f",
	"instanceId": "i-1234567890abcdef0",
	"privateIp": "10.0.7.10",
	"region": "us-east-1"
}`

func newSigner(t *testing.T) *Signer {
	t.Helper()
	s, err := NewSigner()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestSignVerify(t *testing.T) {
	s := newSigner(t)
	p7, err := s.Sign([]byte(testDoc))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(p7, "\n") {
		if len(line) > 64 {
			t.Fatalf("line longer than 64 columns: %q", line)
		}
	}
	d, err := Verify([]byte(testDoc), p7, []*x509.Certificate{s.Cert})
	if err != nil {
		t.Fatalf("verify: %v", err)
	}
	if d.AccountID != "123456789012" || d.InstanceID != "i-1234567890abcdef0" || d.Region != "us-east-1" || d.AvailabilityZone != "us-east-1f" || d.PrivateIP != "10.0.7.10" {
		t.Fatalf("document: %+v", d)
	}
	// PEM from a file, as an operator would configure it.
	certs, err := ParseCertificates(s.CertPEM)
	if err != nil || len(certs) != 1 {
		t.Fatalf("parse certificates: %v", err)
	}
	if _, err := Verify([]byte(testDoc), p7, certs); err != nil {
		t.Fatalf("verify with parsed PEM: %v", err)
	}
}

func TestVerifyRefuses(t *testing.T) {
	s, other := newSigner(t), newSigner(t)
	p7, err := s.Sign([]byte(testDoc))
	if err != nil {
		t.Fatal(err)
	}
	otherP7, err := other.Sign([]byte(testDoc))
	if err != nil {
		t.Fatal(err)
	}
	certs := []*x509.Certificate{s.Cert}
	der, _ := base64.StdEncoding.DecodeString(strings.ReplaceAll(p7, "\n", ""))
	flipped := append([]byte(nil), der...)
	flipped[len(flipped)-10] ^= 0xff // inside the signature
	cases := map[string]struct {
		doc, p7 string
		certs   []*x509.Certificate
	}{
		"other document":      {strings.Replace(testDoc, "123456789012", "999999999999", 1), p7, certs},
		"other signer":        {testDoc, otherP7, certs},
		"no certificates":     {testDoc, p7, nil},
		"corrupted signature": {testDoc, base64.StdEncoding.EncodeToString(flipped), certs},
		"not base64":          {testDoc, "%%%", certs},
		"not pkcs7":           {testDoc, base64.StdEncoding.EncodeToString([]byte("hello")), certs},
		"empty":               {testDoc, "", certs},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := Verify([]byte(c.doc), c.p7, c.certs)
			if !errors.Is(err, ErrSignature) {
				t.Fatalf("want ErrSignature, got %v", err)
			}
		})
	}
}

func TestVerifyDetached(t *testing.T) {
	s := newSigner(t)
	sd, err := pkcs7.NewSignedData([]byte(testDoc))
	if err != nil {
		t.Fatal(err)
	}
	if err := sd.AddSigner(s.Cert, s.Key, pkcs7.SignerInfoConfig{}); err != nil {
		t.Fatal(err)
	}
	sd.Detach()
	der, err := sd.Finish()
	if err != nil {
		t.Fatal(err)
	}
	b64 := base64.StdEncoding.EncodeToString(der)
	if _, err := Verify([]byte(testDoc), b64, []*x509.Certificate{s.Cert}); err != nil {
		t.Fatalf("detached: %v", err)
	}
	if _, err := Verify([]byte(strings.Replace(testDoc, "x86_64", "arm64", 1)), b64, []*x509.Certificate{s.Cert}); !errors.Is(err, ErrSignature) {
		t.Fatalf("detached over another document: want ErrSignature, got %v", err)
	}
}

// TestVerifyAWS checks a document that AWS really signed (BER, DSA-SHA1, no embedded
// certificate) against AWS's published DSA certificate: the format the intake meets.
func TestVerifyAWS(t *testing.T) {
	b64, err := os.ReadFile("testdata/aws-pkcs7.b64")
	if err != nil {
		t.Fatal(err)
	}
	certs, err := LoadCertificates("testdata/aws-dsa-cert.pem")
	if err != nil {
		t.Fatal(err)
	}
	der, err := base64.StdEncoding.DecodeString(strings.ReplaceAll(string(b64), "\n", ""))
	if err != nil {
		t.Fatal(err)
	}
	p7, err := pkcs7.Parse(der)
	if err != nil {
		t.Fatal(err)
	}
	doc := p7.Content
	d, err := Verify(doc, string(b64), certs)
	if err != nil {
		t.Fatalf("verify AWS document: %v", err)
	}
	if d.AccountID != "121659014334" || d.InstanceID != "i-f79fe56c" || d.Region != "us-east-1" {
		t.Fatalf("document: %+v", d)
	}
	tampered := []byte(strings.Replace(string(doc), "i-f79fe56c", "i-f79fe56d", 1))
	if _, err := Verify(tampered, string(b64), certs); !errors.Is(err, ErrSignature) {
		t.Fatalf("tampered document: want ErrSignature, got %v", err)
	}
	// The same document with another DSA signature value must fail too.
	s := newSigner(t)
	if _, err := Verify(doc, string(b64), []*x509.Certificate{s.Cert}); !errors.Is(err, ErrSignature) {
		t.Fatalf("wrong certificate: want ErrSignature, got %v", err)
	}
}
