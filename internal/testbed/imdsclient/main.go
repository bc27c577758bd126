// Command imds-client is the test bed's IMDS client built on aws-sdk-go-v2's
// feature/ec2/imds, the client every AWS SDK-based program on an instance uses.
//
//	imds-client sdk            token PUT, then instance id and role credentials (IMDSv2)
//	imds-client connect-exit   connect to IMDS, send a request and exit without waiting
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "imds-client:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("usage: imds-client sdk|connect-exit")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	switch args[0] {
	case "sdk":
		return sdk(ctx)
	case "connect-exit":
		return connectExit(ctx)
	}
	return fmt.Errorf("unknown mode %q", args[0])
}

func sdk(ctx context.Context) error {
	// EnableFallback off: this client must speak IMDSv2 only, like a modern SDK.
	client := imds.New(imds.Options{EnableFallback: aws.FalseTernary})
	id, err := get(ctx, client, "instance-id")
	if err != nil {
		return err
	}
	roles, err := get(ctx, client, "iam/security-credentials/")
	if err != nil {
		return err
	}
	role := strings.TrimSpace(strings.SplitN(roles, "\n", 2)[0])
	credsJSON, err := get(ctx, client, "iam/security-credentials/"+role)
	if err != nil {
		return err
	}
	var creds struct{ AccessKeyId string }
	if err := json.Unmarshal([]byte(credsJSON), &creds); err != nil {
		return fmt.Errorf("decode credentials: %w", err)
	}
	// Print the key id only: a test client must not spread secrets either.
	return json.NewEncoder(os.Stdout).Encode(map[string]any{
		"pid": os.Getpid(), "instance_id": id, "role": role, "access_key_id": creds.AccessKeyId,
	})
}

func get(ctx context.Context, c *imds.Client, path string) (string, error) {
	out, err := c.GetMetadata(ctx, &imds.GetMetadataInput{Path: path})
	if err != nil {
		return "", fmt.Errorf("get %s: %w", path, err)
	}
	defer out.Content.Close()
	b, err := io.ReadAll(out.Content)
	if err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	return string(b), nil
}

// connectExit is the short-lived client: by the time anyone looks in /proc, it is gone.
func connectExit(ctx context.Context) error {
	addr := os.Getenv("IMDS_ADDR")
	if addr == "" {
		addr = "169.254.169.254:80"
	}
	conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("connect %s: %w", addr, err)
	}
	_, err = io.WriteString(conn, "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
	fmt.Println(os.Getpid())
	return err
}
