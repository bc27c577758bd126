package hostid

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsretry "github.com/aws/aws-sdk-go-v2/aws/retry"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
)

// Client is the agent's one way to IMDS: the SDK's client, IMDSv2 only, one try per
// call (callers own their retries and log them), over the HTTP client given, which in
// the agent uses sockets the kernel program never redirects to the broker.
type Client struct {
	c *imds.Client
}

// NewClient returns a client for IMDS at endpoint ("http://169.254.169.254:80"; ""
// means the SDK's default). hc may be nil.
func NewClient(endpoint string, hc *http.Client) *Client {
	o := imds.Options{
		Endpoint: endpoint,
		// IMDSv2 only: the agent that tells people to stop using IMDSv1 must not use it
		// (an IMDSv1 call would count in the instance's MetadataNoToken metric).
		EnableFallback: aws.FalseTernary,
		Retryer:        awsretry.AddWithMaxAttempts(awsretry.NewStandard(), 1),
	}
	if hc != nil {
		o.HTTPClient = hc
	}
	return &Client{c: imds.New(o)}
}

// maxAnswer bounds what is read of one IMDS answer; the largest the agent reads, the
// identity document's PKCS#7 signature, is about 1.5 KiB.
const maxAnswer = 64 << 10

func readAll(rc io.ReadCloser, what string) (string, error) {
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, maxAnswer))
	if err != nil {
		return "", fmt.Errorf("read %s: %w", what, err)
	}
	return string(b), nil
}

func (c *Client) dynamic(ctx context.Context, path string) (string, error) {
	out, err := c.c.GetDynamicData(ctx, &imds.GetDynamicDataInput{Path: path})
	if err != nil {
		return "", fmt.Errorf("IMDS dynamic/%s: %w", path, err)
	}
	return readAll(out.Content, path)
}

// Metadata reads one meta-data path (e.g. "instance-id").
func (c *Client) Metadata(ctx context.Context, path string) (string, error) {
	out, err := c.c.GetMetadata(ctx, &imds.GetMetadataInput{Path: path})
	if err != nil {
		return "", fmt.Errorf("IMDS meta-data/%s: %w", path, err)
	}
	return readAll(out.Content, path)
}

// Document returns the instance identity document and its PKCS#7 signature, exactly as
// IMDS served them (the correlator verifies the pair byte for byte).
func (c *Client) Document(ctx context.Context) (doc, pkcs7 string, err error) {
	if doc, err = c.dynamic(ctx, "instance-identity/document"); err != nil {
		return "", "", err
	}
	if pkcs7, err = c.dynamic(ctx, "instance-identity/pkcs7"); err != nil {
		return "", "", err
	}
	return doc, pkcs7, nil
}

// ParseDocument reads the fields the agent uses from an identity document.
func ParseDocument(doc string) (Identity, error) {
	var d struct {
		InstanceID       string `json:"instanceId"`
		AccountID        string `json:"accountId"`
		Region           string `json:"region"`
		AvailabilityZone string `json:"availabilityZone"`
		InstanceType     string `json:"instanceType"`
		ImageID          string `json:"imageId"`
	}
	if err := json.Unmarshal([]byte(doc), &d); err != nil {
		return Identity{}, fmt.Errorf("decode instance identity document: %w", err)
	}
	if d.InstanceID == "" || d.Region == "" {
		return Identity{}, fmt.Errorf("instance identity document has no instanceId or region")
	}
	return Identity(d), nil
}

// HostFacts returns the instance profile and the public addresses: where, besides its
// interfaces, the instance's own API calls legitimately come from. An instance without
// a public address or a profile answers 404 for it; that is not an error.
func (c *Client) HostFacts(ctx context.Context) (profileARN string, public []netip.Addr, err error) {
	// The token is fetched here, and a failure to get one means IMDS is not there.
	if _, err := c.Metadata(ctx, "instance-id"); err != nil {
		return "", nil, err
	}
	var info struct{ InstanceProfileArn string }
	if body, err := c.Metadata(ctx, "iam/info"); err == nil {
		_ = json.Unmarshal([]byte(body), &info)
	}
	for _, path := range []string{"public-ipv4", "ipv6"} {
		if body, err := c.Metadata(ctx, path); err == nil {
			for _, f := range strings.Fields(body) {
				if a, err := netip.ParseAddr(f); err == nil {
					public = append(public, a)
				}
			}
		}
	}
	return info.InstanceProfileArn, public, nil
}
