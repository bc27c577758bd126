package trailwatch

import (
	"context"
	"encoding/xml"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/rs/zerolog"
)

// fakeS3 is a local S3 stand-in that decodes the SDK's real ListObjectsV2 and GetObject
// requests (path style) and answers in S3's wire format.
type fakeS3 struct {
	mu      sync.Mutex
	bucket  string
	objects map[string]string
	gets    map[string]int
	lists   int
}

type listResult struct {
	XMLName               xml.Name `xml:"ListBucketResult"`
	Xmlns                 string   `xml:"xmlns,attr"`
	Name                  string   `xml:"Name"`
	Prefix                string   `xml:"Prefix"`
	KeyCount              int      `xml:"KeyCount"`
	MaxKeys               int      `xml:"MaxKeys"`
	IsTruncated           bool     `xml:"IsTruncated"`
	NextContinuationToken string   `xml:"NextContinuationToken,omitempty"`
	Contents              []struct {
		Key          string `xml:"Key"`
		LastModified string `xml:"LastModified"`
		ETag         string `xml:"ETag"`
		Size         int    `xml:"Size"`
		StorageClass string `xml:"StorageClass"`
	} `xml:"Contents"`
}

func (f *fakeS3) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !strings.HasPrefix(r.Header.Get("Authorization"), "AWS4-HMAC-SHA256 Credential=AKIDTEST/") {
		http.Error(w, "unsigned request", http.StatusForbidden)
		return
	}
	bucket, key, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/")
	if bucket != f.bucket || r.Method != http.MethodGet {
		http.Error(w, "NoSuchBucket", http.StatusNotFound)
		return
	}
	q := r.URL.Query()
	if key == "" {
		if q.Get("list-type") != "2" {
			http.Error(w, "want ListObjectsV2", http.StatusBadRequest)
			return
		}
		f.lists++
		max, _ := strconv.Atoi(q.Get("max-keys"))
		if max == 0 {
			max = 1000
		}
		var keys []string
		for k := range f.objects {
			if strings.HasPrefix(k, q.Get("prefix")) && k > q.Get("continuation-token") {
				keys = append(keys, k)
			}
		}
		sort.Strings(keys)
		res := listResult{Xmlns: "http://s3.amazonaws.com/doc/2006-03-01/", Name: bucket, Prefix: q.Get("prefix"), MaxKeys: max}
		if len(keys) > max {
			keys, res.IsTruncated, res.NextContinuationToken = keys[:max], true, keys[max-1]
		}
		for _, k := range keys {
			res.Contents = append(res.Contents, struct {
				Key          string `xml:"Key"`
				LastModified string `xml:"LastModified"`
				ETag         string `xml:"ETag"`
				Size         int    `xml:"Size"`
				StorageClass string `xml:"StorageClass"`
			}{k, "2026-11-20T10:00:00.000Z", fmt.Sprintf("\"%x\"", len(f.objects[k])), len(f.objects[k]), "STANDARD"})
		}
		res.KeyCount = len(res.Contents)
		w.Header().Set("Content-Type", "application/xml")
		io.WriteString(w, xml.Header)
		xml.NewEncoder(w).Encode(res)
		return
	}
	body, ok := f.objects[key]
	if !ok {
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, `<?xml version="1.0"?><Error><Code>NoSuchKey</Code><Message>no</Message></Error>`)
		return
	}
	f.gets[key]++
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Header().Set("ETag", fmt.Sprintf("\"%x\"", len(body)))
	io.WriteString(w, body)
}

func newS3Client(url string) *s3.Client {
	return s3.New(s3.Options{
		Region: "us-east-1", BaseEndpoint: aws.String(url), UsePathStyle: true,
		Credentials: credentials.NewStaticCredentialsProvider("AKIDTEST", "secret", ""),
	})
}

type collected struct {
	mu    sync.Mutex
	files []string
}

func (c *collected) read(name string, r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.files = append(c.files, name+"="+string(b))
	c.mu.Unlock()
	return nil
}

func TestS3FollowCheckpointed(t *testing.T) {
	fake := &fakeS3{bucket: "trail", gets: map[string]int{}, objects: map[string]string{
		"AWSLogs/1/CloudTrail/us-east-1/2026/11/20/a.json.gz":             "A",
		"AWSLogs/1/CloudTrail/us-east-1/2026/11/20/b.json.gz":             "B",
		"AWSLogs/1/CloudTrail/us-east-1/2026/11/20/c.json.gz":             "C",
		"AWSLogs/1/CloudTrail-Digest/us-east-1/2026/11/20/digest.json.gz": "D",
		"other/x.json": "X",
	}}
	srv := httptest.NewServer(fake)
	defer srv.Close()
	cp := filepath.Join(t.TempDir(), "checkpoint.json")
	poll := func() []string {
		c, err := LoadCheckpoint(cp)
		if err != nil {
			t.Fatal(err)
		}
		got := &collected{}
		f := &Follower{Lister: &S3{Client: newS3Client(srv.URL), Bucket: "trail", Prefix: "AWSLogs/", MaxKeys: 2}, Checkpoint: c, Read: got.read, Log: zerolog.Nop()}
		if _, err := f.Poll(context.Background()); err != nil {
			t.Fatal(err)
		}
		return got.files
	}
	if got := poll(); strings.Join(got, ",") != "AWSLogs/1/CloudTrail/us-east-1/2026/11/20/a.json.gz=A,AWSLogs/1/CloudTrail/us-east-1/2026/11/20/b.json.gz=B,AWSLogs/1/CloudTrail/us-east-1/2026/11/20/c.json.gz=C" {
		t.Fatalf("first poll: %v", got)
	}
	if fake.lists < 2 {
		t.Fatalf("listing was not paged: %d list calls", fake.lists)
	}
	// A restart (new Follower, same checkpoint) repeats nothing and picks up new files.
	fake.mu.Lock()
	fake.objects["AWSLogs/1/CloudTrail/us-east-1/2026/11/20/b2.json.gz"] = "B2"
	fake.mu.Unlock()
	if got := poll(); len(got) != 1 || got[0] != "AWSLogs/1/CloudTrail/us-east-1/2026/11/20/b2.json.gz=B2" {
		t.Fatalf("after restart: %v", got)
	}
	if got := poll(); len(got) != 0 {
		t.Fatalf("third poll repeated: %v", got)
	}
	for k, n := range fake.gets {
		if n != 1 {
			t.Errorf("%s fetched %d times", k, n)
		}
	}
}

func TestDirFollowCheckpointed(t *testing.T) {
	root := t.TempDir()
	cp := filepath.Join(t.TempDir(), "checkpoint.json")
	write := func(name, body string) {
		p := filepath.Join(root, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	poll := func() []string {
		c, err := LoadCheckpoint(cp)
		if err != nil {
			t.Fatal(err)
		}
		got := &collected{}
		f := &Follower{Lister: &Dir{Root: root}, Checkpoint: c, Read: got.read, Log: zerolog.Nop()}
		if _, err := f.Poll(context.Background()); err != nil {
			t.Fatal(err)
		}
		return got.files
	}
	write("2026/11/20/a.json", "A")
	write("2026/11/20/.b.json.tmp", "partial")
	if got := poll(); strings.Join(got, ",") != "2026/11/20/a.json=A" {
		t.Fatalf("%v", got)
	}
	write("2026/11/20/b.json", "B")
	if got := poll(); strings.Join(got, ",") != "2026/11/20/b.json=B" {
		t.Fatalf("%v", got)
	}
	if got := poll(); len(got) != 0 {
		t.Fatalf("repeated: %v", got)
	}
}
