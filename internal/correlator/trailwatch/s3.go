package trailwatch

import (
	"context"
	"fmt"
	"io"

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
