package trailwatch

import (
	"context"
	"fmt"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/trailwatch/trailwatchtest"
)

func newS3Client(url string) *s3.Client {
	return s3.New(s3.Options{
		Region: "us-east-1", BaseEndpoint: aws.String(url), UsePathStyle: true,
		Credentials: credentials.NewStaticCredentialsProvider(trailwatchtest.AccessKeyID, "secret", ""),
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
	fake := trailwatchtest.NewS3("trail")
	for k, v := range map[string]string{
		"AWSLogs/1/CloudTrail/us-east-1/2026/11/20/a.json.gz":             "A",
		"AWSLogs/1/CloudTrail/us-east-1/2026/11/20/b.json.gz":             "B",
		"AWSLogs/1/CloudTrail/us-east-1/2026/11/20/c.json.gz":             "C",
		"AWSLogs/1/CloudTrail-Digest/us-east-1/2026/11/20/digest.json.gz": "D",
		"other/x.json": "X",
	} {
		fake.Put(k, v)
	}
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
	if fake.Lists() < 2 {
		t.Fatalf("listing was not paged: %d list calls", fake.Lists())
	}
	// A restart (new Follower, same checkpoint) repeats nothing and picks up new files.
	fake.Put("AWSLogs/1/CloudTrail/us-east-1/2026/11/20/b2.json.gz", "B2")
	if got := poll(); len(got) != 1 || got[0] != "AWSLogs/1/CloudTrail/us-east-1/2026/11/20/b2.json.gz=B2" {
		t.Fatalf("after restart: %v", got)
	}
	if got := poll(); len(got) != 0 {
		t.Fatalf("third poll repeated: %v", got)
	}
	for _, k := range []string{"a", "b", "b2", "c"} {
		if n := fake.Gets("AWSLogs/1/CloudTrail/us-east-1/2026/11/20/" + k + ".json.gz"); n != 1 {
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

// An organisation trail's bucket: one partition per account and region. After the
// first poll, a poll lists only the last two days of each partition, and still finds a
// file that sorts before another partition's newest key.
func TestS3ListsIncrementally(t *testing.T) {
	fake := trailwatchtest.NewS3("trail")
	a := "AWSLogs/o-1/111111111111/CloudTrail/us-east-1/"
	b := "AWSLogs/o-1/222222222222/CloudTrail/eu-west-1/"
	for d := 1; d <= 20; d++ {
		fake.Put(fmt.Sprintf("%s2026/11/%02d/a%02d.json.gz", a, d, d), "A")
	}
	fake.Put(b+"2026/11/20/b.json.gz", "B")
	fake.Put("AWSLogs/o-1/111111111111/CloudTrail-Digest/us-east-1/2026/11/20/d.json.gz", "D")
	srv := httptest.NewServer(fake)
	defer srv.Close()
	c, err := LoadCheckpoint(filepath.Join(t.TempDir(), "cp.json"))
	if err != nil {
		t.Fatal(err)
	}
	lister := &S3{Client: newS3Client(srv.URL), Bucket: "trail", Prefix: "AWSLogs/"}
	got := &collected{}
	f := &Follower{Lister: lister, Checkpoint: c, Read: got.read, Log: zerolog.Nop()}
	if n, err := f.Poll(context.Background()); err != nil || n != 21 {
		t.Fatalf("first poll: %d %v", n, err)
	}
	objs, err := lister.ListSince(context.Background(), c.Done[lister.ID()])
	if err != nil {
		t.Fatal(err)
	}
	// a19, a20 and b: the two newest days of a, the one day of b.
	if len(objs) != 3 {
		t.Fatalf("listed %d objects: %v", len(objs), objs)
	}
	fake.Put(a+"2026/11/20/a20-late.json.gz", "L")
	fake.Put(a+"2026/11/21/a21.json.gz", "N")
	got.files = nil
	if n, err := f.Poll(context.Background()); err != nil || n != 2 {
		t.Fatalf("second poll: %d %v %v", n, err, got.files)
	}
	if n := fake.Gets(a + "2026/11/01/a01.json.gz"); n != 1 {
		t.Fatalf("old file fetched %d times", n)
	}
}
