package intake

import (
	"bytes"
	"io"
	"path/filepath"
	"testing"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/iddoc"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
	"github.com/imdsguard/imdsguard/internal/wire"
)

// TestPrivilegedBedIdentityAccepted fetches the identity document and its pkcs7 from the
// test bed's IMDS, as an agent does, and gets a batch accepted with them: the bed
// serves a document signed the way AWS signs it.
func TestPrivilegedBedIdentityAccepted(t *testing.T) {
	tb := testbed.Start(t, testbed.Options{})
	client := tb.HTTPClient()
	get := func(path string) []byte {
		t.Helper()
		resp, err := client.Get("http://" + testbed.IMDSv4.String() + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		data, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("GET %s: %d %v", path, resp.StatusCode, err)
		}
		return data
	}
	doc := get("/latest/dynamic/instance-identity/document")
	p7 := get("/latest/dynamic/instance-identity/pkcs7")
	if !bytes.Equal(doc, tb.IdentityDocument) {
		t.Fatalf("emulator serves another document than the bed signed:\n%s\n---\n%s", doc, tb.IdentityDocument)
	}
	certs, err := iddoc.ParseCertificates(tb.SigningCertPEM)
	if err != nil {
		t.Fatal(err)
	}
	store, err := OpenSQLite(filepath.Join(t.TempDir(), "fp.db"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	b := &bed{h: NewHandler(Options{Store: store, AWSCertificates: certs, AllowedAccounts: []string{tb.AccountID}, Log: zerolog.Nop()}), store: store}
	b.srv = newTLSServer(t, b.h)
	f := fp("bed1", tb.InstanceID, tb.AccountID)
	status, out := b.postBatch(t, Batch{Document: string(doc), PKCS7: string(p7), BatchID: "bed", Fingerprints: []wire.Fingerprint{f}})
	if status != 200 || out["accepted"] != 1.0 {
		t.Fatalf("batch with the bed's document: %d %v", status, out)
	}
	// The same document under another instance's fingerprint is refused.
	status, _ = b.postBatch(t, Batch{Document: string(doc), PKCS7: string(p7), BatchID: "bed2", Fingerprints: []wire.Fingerprint{fp("bed2", "i-0000000000000bad0", tb.AccountID)}})
	if status != 403 {
		t.Fatalf("other instance: %d", status)
	}
}
