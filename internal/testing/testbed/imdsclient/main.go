// Command imds-client is the test bed's IMDS client built on aws-sdk-go-v2's
// feature/ec2/imds, the client every AWS SDK-based program on an instance uses.
//
//	imds-client sdk            token PUT, then instance id and role credentials (IMDSv2)
//	imds-client creds-v2       the role's credentials through aws-sdk-go-v2's ec2rolecreds
//	                           provider, as a program using the default chain gets them
//	imds-client creds-v1       the same through aws-sdk-go (v1)'s ec2rolecreds provider
//	imds-client connect-exit   connect to IMDS, send a request and exit without waiting
//	imds-client connect-loop N tcp|udp
//	                           N connect()+close() to a loopback listener of its own;
//	                           prints CPU nanoseconds per connect (benchmark baseline)
//	imds-client send-loop N    N 64-byte UDP datagrams to a loopback socket of its own,
//	                           from a connected socket (no connect hook per packet);
//	                           prints CPU nanoseconds per send (the egress hook's cost)
//	imds-client http-load N keepalive|new
//	                           N sequential IMDSv2 GETs of instance-id; prints JSON with
//	                           p50/p99 latency (µs) and requests per second
//	imds-client peername       connect to IMDS and print what getpeername(2) says
//	imds-client get URL        one GET without a token (IMDSv1); prints JSON with the
//	                           status, or exits 1 with the connection error
//	imds-client creds-container
//	                           credentials through aws-sdk-go-v2's default chain from
//	                           AWS_CONTAINER_CREDENTIALS_RELATIVE_URI (ECS) or _FULL_URI
//	                           with its token file (EKS Pod Identity), as a program in a
//	                           task or pod gets them; prints the key id
//	imds-client touch-sleep    connect to IMDS once (whatever comes of it), then sleep
//	                           until killed: a namespace's one long-lived process
//	imds-client hold           connect to IMDS, print "connected", keep it open until killed
//	imds-client udp-flood RATE SECONDS ADDR:PORT
//	                           UDP connect() to ADDR:PORT at RATE/s (0: flat out); UDP
//	                           connect runs the connect hook but sends nothing; prints
//	                           the number of connects made
package main

import (
	"errors"
	"net/http"
	"net/netip"
	"slices"
	"strconv"

	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	// aws-sdk-go v1 is deprecated, but programs on instances still ship it: tested on purpose.
	awsv1 "github.com/aws/aws-sdk-go/aws" //nolint:staticcheck // see above
	"github.com/aws/aws-sdk-go/aws/credentials/ec2rolecreds"
	"github.com/aws/aws-sdk-go/aws/ec2metadata" //nolint:staticcheck // see above
	"github.com/aws/aws-sdk-go/aws/session"     //nolint:staticcheck // see above

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	ec2rolecredsv2 "github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "imds-client:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("usage: imds-client sdk|connect-exit|connect-loop|udp-flood")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	switch args[0] {
	case "sdk":
		return sdk(ctx)
	case "creds-v2":
		return credsV2(ctx)
	case "creds-v1":
		return credsV1()
	case "connect-exit":
		return connectExit(ctx)
	case "connect-loop":
		return connectLoop(args[1:])
	case "send-loop":
		return sendLoop(args[1:])
	case "udp-flood":
		return udpFlood(args[1:])
	case "hold":
		return hold()
	case "peername":
		return peername()
	case "http-load":
		return httpLoad(args[1:])
	case "get":
		if len(args) != 2 {
			return fmt.Errorf("usage: get URL")
		}
		return getV1(ctx, args[1])
	case "creds-container":
		return credsContainer(ctx)
	case "touch-sleep":
		if c, err := net.DialTimeout("tcp", "169.254.169.254:80", 2*time.Second); err == nil {
			c.Close()
		}
		select {}
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

// credsV2 fetches credentials with the SDK's defaults (IMDSv2 with fallback, its own
// retries and timeouts), so a test sees what a program on an instance sees.
func credsV2(ctx context.Context) error {
	creds, err := ec2rolecredsv2.New().Retrieve(ctx)
	if err != nil {
		return fmt.Errorf("retrieve credentials: %w", err)
	}
	return printKey(creds.AccessKeyID)
}

// credsV1 is credsV2 with aws-sdk-go v1, which many programs still ship.
func credsV1() error {
	sess, err := session.NewSession(&awsv1.Config{Region: awsv1.String("us-east-1")})
	if err != nil {
		return fmt.Errorf("new session: %w", err)
	}
	creds, err := ec2rolecreds.NewCredentialsWithClient(ec2metadata.New(sess)).Get()
	if err != nil {
		return fmt.Errorf("retrieve credentials: %w", err)
	}
	return printKey(creds.AccessKeyID)
}

// printKey prints the key id only: a test client must not spread secrets.
func printKey(id string) error {
	return json.NewEncoder(os.Stdout).Encode(map[string]any{"pid": os.Getpid(), "access_key_id": id})
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

func connectLoop(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("usage: connect-loop N tcp|udp")
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n <= 0 {
		return fmt.Errorf("bad count %q", args[0])
	}
	typ := unix.SOCK_STREAM
	if args[1] == "udp" {
		typ = unix.SOCK_DGRAM
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	sa := &unix.SockaddrInet4{Port: ln.Addr().(*net.TCPAddr).Port, Addr: [4]byte{127, 0, 0, 1}}
	// Reset on close: no TIME_WAIT, so the loop never runs out of ports.
	linger := &unix.Linger{Onoff: 1, Linger: 0}
	// CPU time, not wall time: on a shared machine, other load changes how long the loop
	// waits, not how much work each connect() costs.
	var before unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &before)
	for i := 0; i < n; i++ {
		fd, err := unix.Socket(unix.AF_INET, typ|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("socket: %w", err)
		}
		if typ == unix.SOCK_STREAM {
			_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, linger)
		}
		if err := unix.Connect(fd, sa); err != nil {
			unix.Close(fd)
			return fmt.Errorf("connect: %w", err)
		}
		unix.Close(fd)
	}
	var after unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &after)
	cpu := time.Duration(after.Utime.Nano() + after.Stime.Nano() - before.Utime.Nano() - before.Stime.Nano())
	fmt.Println(cpu.Nanoseconds() / int64(n))
	return nil
}

func sendLoop(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("usage: send-loop N")
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n <= 0 {
		return fmt.Errorf("bad count %q", args[0])
	}
	// Never read: once its buffer is full the kernel drops what arrives, after every
	// hook on the way out has run.
	rx, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer rx.Close()
	conn, err := net.Dial("udp4", rx.LocalAddr().String())
	if err != nil {
		return err
	}
	defer conn.Close()
	raw, err := conn.(*net.UDPConn).SyscallConn()
	if err != nil {
		return err
	}
	payload := make([]byte, 64)
	var before, after unix.Rusage
	var sendErr error
	unix.Getrusage(unix.RUSAGE_SELF, &before)
	if err := raw.Control(func(fd uintptr) {
		for i := 0; i < n && sendErr == nil; i++ {
			_, sendErr = unix.Write(int(fd), payload)
		}
	}); err != nil {
		return err
	}
	unix.Getrusage(unix.RUSAGE_SELF, &after)
	if sendErr != nil {
		return fmt.Errorf("send: %w", sendErr)
	}
	cpu := time.Duration(after.Utime.Nano() + after.Stime.Nano() - before.Utime.Nano() - before.Stime.Nano())
	fmt.Println(cpu.Nanoseconds() / int64(n))
	return nil
}

func udpFlood(args []string) error {
	if len(args) != 3 {
		return fmt.Errorf("usage: udp-flood RATE SECONDS ADDR:PORT")
	}
	rate, err1 := strconv.Atoi(args[0])
	secs, err2 := strconv.ParseFloat(args[1], 64)
	ap, err3 := netip.ParseAddrPort(args[2])
	if err := errors.Join(err1, err2, err3); err != nil || !ap.Addr().Is4() {
		return fmt.Errorf("bad arguments %q: %v", args, err)
	}
	sa := &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	n := 0
	start := time.Now()
	end := start.Add(time.Duration(secs * float64(time.Second)))
	for {
		now := time.Now()
		if now.After(end) {
			break
		}
		// Pace in small batches so the rate holds without a timer per connect.
		if rate > 0 && n >= int(float64(rate)*now.Sub(start).Seconds()) {
			time.Sleep(100 * time.Microsecond)
			continue
		}
		for i := 0; i < 32; i++ {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("socket: %w", err)
			}
			err = unix.Connect(fd, sa)
			unix.Close(fd)
			if err != nil {
				return fmt.Errorf("connect: %w", err)
			}
			n++
		}
	}
	fmt.Println(n)
	return nil
}

func hold() error {
	conn, err := net.Dial("tcp", "169.254.169.254:80")
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close()
	fmt.Println("connected")
	select {}
}

func httpLoad(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("usage: http-load N keepalive|new")
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n <= 0 {
		return fmt.Errorf("bad count %q", args[0])
	}
	tr := &http.Transport{Proxy: nil, DisableKeepAlives: args[1] == "new", MaxIdleConnsPerHost: 1}
	c := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	base := "http://169.254.169.254"
	req, _ := http.NewRequest(http.MethodPut, base+"/latest/api/token", nil)
	req.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", "600")
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	tok, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	lat := make([]time.Duration, 0, n)
	start := time.Now()
	for i := 0; i < n; i++ {
		t0 := time.Now()
		req, _ := http.NewRequest(http.MethodGet, base+"/latest/meta-data/instance-id", nil)
		req.Header.Set("X-aws-ec2-metadata-token", string(tok))
		resp, err := c.Do(req)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		lat = append(lat, time.Since(t0))
	}
	total := time.Since(start)
	slices.Sort(lat)
	return json.NewEncoder(os.Stdout).Encode(map[string]float64{
		"p50_us": float64(lat[len(lat)/2].Microseconds()),
		"p99_us": float64(lat[len(lat)*99/100].Microseconds()),
		"rps":    float64(n) / total.Seconds(),
	})
}

func peername() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: 80, Addr: [4]byte{169, 254, 169, 254}}); err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	sa, err := unix.Getpeername(fd)
	if err != nil {
		return fmt.Errorf("getpeername: %w", err)
	}
	in4, ok := sa.(*unix.SockaddrInet4)
	if !ok {
		return fmt.Errorf("getpeername: %T", sa)
	}
	fmt.Printf("%s\n", netip.AddrPortFrom(netip.AddrFrom4(in4.Addr), uint16(in4.Port)))
	return nil
}

// getV1 sends one GET without a token and reports the status.
func getV1(ctx context.Context, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	c := &http.Client{Transport: &http.Transport{Proxy: nil}, Timeout: 5 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	return json.NewEncoder(os.Stdout).Encode(map[string]any{"pid": os.Getpid(), "status": resp.StatusCode, "bytes": len(body)})
}

// credsContainer resolves credentials the way a program in an ECS task or an EKS pod
// does: the SDK's default chain, which reads the container credential variables.
func credsContainer(ctx context.Context) error {
	cfg, err := config.LoadDefaultConfig(ctx, config.WithRegion("us-east-1"))
	if err != nil {
		return fmt.Errorf("load config: %w", err)
	}
	creds, err := cfg.Credentials.Retrieve(ctx)
	if err != nil {
		return fmt.Errorf("retrieve credentials: %w", err)
	}
	return printKey(creds.AccessKeyID)
}
