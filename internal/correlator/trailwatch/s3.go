package trailwatch

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// S3 lists a bucket and prefix with ListObjectsV2 and reads objects with GetObject.
type S3 struct {
	Client  *s3.Client
	Bucket  string
	Prefix  string
	MaxKeys int32 // per ListObjectsV2 page; 0 means S3's default (1000)
}

// ID implements Lister.
func (s *S3) ID() string { return "s3://" + s.Bucket + "/" + s.Prefix }

// List implements Lister.
func (s *S3) List(ctx context.Context) ([]Object, error) {
	in := &s3.ListObjectsV2Input{Bucket: aws.String(s.Bucket), Prefix: aws.String(s.Prefix)}
	if s.MaxKeys > 0 {
		in.MaxKeys = aws.Int32(s.MaxKeys)
	}
	var out []Object
	p := s3.NewListObjectsV2Paginator(s.Client, in)
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, fmt.Errorf("list s3://%s/%s: %w", s.Bucket, s.Prefix, err)
		}
		for _, o := range page.Contents {
			out = append(out, Object{Name: aws.ToString(o.Key), Size: aws.ToInt64(o.Size), Tag: aws.ToString(o.ETag)})
		}
	}
	return out, nil
}

// Open implements Lister.
func (s *S3) Open(ctx context.Context, name string) (io.ReadCloser, error) {
	out, err := s.Client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(s.Bucket), Key: aws.String(name)})
	if err != nil {
		return nil, fmt.Errorf("get s3://%s/%s: %w", s.Bucket, name, err)
	}
	return out.Body, nil
}

// ListSince lists incrementally: a trail bucket holds one partition per account and
// region (…/AWSLogs/[org/]ACCOUNT/CloudTrail/REGION/YYYY/MM/DD/file), and in each only
// the keys after the day before the newest day already read are listed (StartAfter), so
// a poll costs a few requests per partition instead of the whole history. The day of
// slack keeps files CloudTrail delivers late, or after midnight for the day before.
// done holds the names already read (the checkpoint). A prefix not in CloudTrail's
// layout is listed whole.
func (s *S3) ListSince(ctx context.Context, done map[string]string) ([]Object, error) {
	var parts []string
	var objs []Object
	if err := s.walk(ctx, s.Prefix, 0, &parts, &objs); err != nil {
		return nil, err
	}
	if len(parts) == 0 {
		return s.List(ctx)
	}
	newest := map[string]string{} // partition → newest day directory read ("2026/11/20/")
	for name := range done {
		if p, day, ok := splitPartition(name); ok && day > newest[p] {
			newest[p] = day
		}
	}
	for _, p := range parts {
		in := &s3.ListObjectsV2Input{Bucket: aws.String(s.Bucket), Prefix: aws.String(p)}
		if day, ok := newest[p]; ok {
			if t, err := time.Parse("2006/01/02/", day); err == nil {
				in.StartAfter = aws.String(p + t.AddDate(0, 0, -1).Format("2006/01/02/"))
			}
		}
		if s.MaxKeys > 0 {
			in.MaxKeys = aws.Int32(s.MaxKeys)
		}
		pg := s3.NewListObjectsV2Paginator(s.Client, in)
		for pg.HasMorePages() {
			page, err := pg.NextPage(ctx)
			if err != nil {
				return nil, fmt.Errorf("list s3://%s/%s: %w", s.Bucket, p, err)
			}
			for _, o := range page.Contents {
				objs = append(objs, Object{Name: aws.ToString(o.Key), Size: aws.ToInt64(o.Size), Tag: aws.ToString(o.ETag)})
			}
		}
	}
	return objs, nil
}

// walk finds the partitions below prefix with delimiter listings; objects met on the
// way (outside any partition) are returned as they are.
func (s *S3) walk(ctx context.Context, prefix string, depth int, parts *[]string, objs *[]Object) error {
	if isPartition(prefix) {
		*parts = append(*parts, prefix)
		return nil
	}
	if depth > 8 {
		return nil
	}
	pg := s3.NewListObjectsV2Paginator(s.Client, &s3.ListObjectsV2Input{Bucket: aws.String(s.Bucket), Prefix: aws.String(prefix), Delimiter: aws.String("/")})
	var subs []string
	for pg.HasMorePages() {
		page, err := pg.NextPage(ctx)
		if err != nil {
			return fmt.Errorf("list s3://%s/%s: %w", s.Bucket, prefix, err)
		}
		for _, o := range page.Contents {
			*objs = append(*objs, Object{Name: aws.ToString(o.Key), Size: aws.ToInt64(o.Size), Tag: aws.ToString(o.ETag)})
		}
		for _, cp := range page.CommonPrefixes {
			subs = append(subs, aws.ToString(cp.Prefix))
		}
	}
	for _, sub := range subs {
		if strings.HasSuffix(sub, "/CloudTrail-Digest/") {
			continue
		}
		if err := s.walk(ctx, sub, depth+1, parts, objs); err != nil {
			return err
		}
	}
	return nil
}

// isPartition reports a prefix ending in CloudTrail/REGION/.
func isPartition(prefix string) bool {
	segs := strings.Split(strings.TrimSuffix(prefix, "/"), "/")
	return len(segs) >= 2 && segs[len(segs)-2] == "CloudTrail" && strings.HasSuffix(prefix, "/")
}

// splitPartition splits a key into its partition and its day directory.
func splitPartition(key string) (partition, day string, ok bool) {
	i := strings.Index(key, "/CloudTrail/")
	if i < 0 {
		return "", "", false
	}
	rest := key[i+len("/CloudTrail/"):]
	j := strings.IndexByte(rest, '/')
	if j < 0 || len(rest) < j+1+len("2006/01/02/") {
		return "", "", false
	}
	partition = key[:i+len("/CloudTrail/")+j+1]
	day = rest[j+1 : j+1+len("2006/01/02/")]
	if _, err := time.Parse("2006/01/02/", day); err != nil {
		return "", "", false
	}
	return partition, day, true
}
