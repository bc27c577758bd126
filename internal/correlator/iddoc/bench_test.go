package iddoc

import (
	"crypto/x509"
	"encoding/base64"
	"os"
	"strings"
	"testing"

	"github.com/smallstep/pkcs7"
)

func BenchmarkVerifyRSA(b *testing.B) {
	s, err := NewSigner()
	if err != nil {
		b.Fatal(err)
	}
	p7, err := s.Sign([]byte(testDoc))
	if err != nil {
		b.Fatal(err)
	}
	certs := []*x509.Certificate{s.Cert}
	for b.Loop() {
		if _, err := Verify([]byte(testDoc), p7, certs); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerifyAWSDSA(b *testing.B) {
	b64, _ := os.ReadFile("testdata/aws-pkcs7.b64")
	certs, err := LoadCertificates("testdata/aws-dsa-cert.pem")
	if err != nil {
		b.Fatal(err)
	}
	der, _ := base64.StdEncoding.DecodeString(strings.ReplaceAll(string(b64), "\n", ""))
	p7, err := pkcs7.Parse(der)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := Verify(p7.Content, string(b64), certs); err != nil {
			b.Fatal(err)
		}
	}
}
