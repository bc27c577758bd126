// Command bench-intake measures how many fingerprints per second the correlator's intake
// accepts over loopback HTTPS (identity document verified, batch stored with group
// commit in SQLite with synchronous=FULL, then in a PostgreSQL started for the run),
// against a baseline handler that only decodes the same JSON over the same TLS, in one
// run (two baselines: encoding/json, strict, as the intake decoded before and as the
// figures so far were measured; and the intake's own one-pass decoder, which shows
// what everything but decoding costs), for batches of 100 and of 1, with 4 concurrent senders (the figures so far) and
// with 16 (a fleet posts concurrently, and batches of 1 share commits then):
//
//	go run ./tools/bench-intake [-senders 4,16] [-fingerprints 20000] [-single 2000] [-rounds 3] [-cpuprofile FILE]
package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/iddoc"
	"github.com/imdsguard/imdsguard/internal/correlator/intake"
	"github.com/imdsguard/imdsguard/internal/correlator/store"
	"github.com/imdsguard/imdsguard/internal/testing/pgtest"
	"github.com/imdsguard/imdsguard/internal/wire"
)

const (
	account  = "123456789012"
	instance = "i-0bench0000000001"
)

func main() {
	sendersFlag := flag.String("senders", "4,16", "concurrent senders (keep-alive connections), a comma-separated list")
	many := flag.Int("fingerprints", 20000, "fingerprints per round in batches of 100")
	single := flag.Int("single", 2000, "fingerprints per round in batches of 1")
	rounds := flag.Int("rounds", 3, "alternating rounds of baseline and intake; the median is reported")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file (go tool pprof)")
	flag.Parse()
	var senders []int
	for _, f := range strings.Split(*sendersFlag, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			fmt.Fprintf(os.Stderr, "bench-intake: -senders: %q is not a positive number\n", f)
			os.Exit(2)
		}
		senders = append(senders, n)
	}
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench-intake: cpu profile: %v\n", err)
			os.Exit(1)
		}
		defer f.Close()
		defer pprof.StopCPUProfile()
	}
	if err := run(senders, *many, *single, *rounds); err != nil {
		fmt.Fprintf(os.Stderr, "bench-intake: %v\n", err)
		pprof.StopCPUProfile()
		os.Exit(1)
	}
}

// server is one loopback HTTPS endpoint.
type server struct {
	url   string
	close func()
}

func run(senders []int, many, single, rounds int) error {
	dir, err := os.MkdirTemp("", "bench-intake")
	if err != nil {
		return fmt.Errorf("create temp dir: %w", err)
	}
	defer os.RemoveAll(dir)
	signer, err := iddoc.NewSigner()
	if err != nil {
		return err
	}
	doc := fmt.Sprintf("{\n\t\"accountId\": %q,\n\t\"instanceId\": %q,\n\t\"region\": \"us-east-1\"\n}", account, instance)
	p7, err := signer.Sign([]byte(doc))
	if err != nil {
		return err
	}
	tlsCfg, roots, err := loopbackTLS()
	if err != nil {
		return err
	}
	var clients []*http.Client
	for _, n := range senders {
		clients = append(clients, &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, MaxIdleConnsPerHost: n}, Timeout: time.Minute})
	}
	base, err := serve(http.HandlerFunc(decodeOnly), tlsCfg)
	if err != nil {
		return err
	}
	defer base.close()
	same, err := serve(http.HandlerFunc(decodeSame), tlsCfg)
	if err != nil {
		return err
	}
	defer same.close()
	fmt.Printf("intake: loopback HTTPS (TLS 1.3), RSA-2048 signed identity document, senders %v\n", senders)
	seq := 0
	engines := []struct {
		name, driver string
		dsn          func() (string, func(), error)
	}{
		{"SQLite (WAL, synchronous=FULL)", store.SQLite, func() (string, func(), error) {
			return filepath.Join(dir, "fingerprints.db"), func() {}, nil
		}},
		{"PostgreSQL (unix socket, fsync on)", store.Postgres, func() (string, func(), error) {
			pg, err := pgtest.Start()
			if err != nil {
				return "", nil, err
			}
			dsn, err := pg.NewDatabase(context.Background())
			if err != nil {
				pg.Stop()
				return "", nil, err
			}
			return dsn, func() { pg.Stop() }, nil
		}},
	}
	for _, e := range engines {
		dsn, stop, err := e.dsn()
		if errors.Is(err, pgtest.ErrNoPostgres) {
			fmt.Printf("%s: skipped: %v\n", e.name, err)
			continue
		}
		if err != nil {
			return err
		}
		err = bench(e.name, e.driver, dsn, clients, [2]*server{&base, &same}, signer, tlsCfg, doc, p7, many, single, rounds, &seq)
		stop()
		if err != nil {
			return err
		}
	}
	return nil
}

// bench measures the intake on one database engine against the decode-only baseline.
func bench(name, driver, dsn string, clients []*http.Client, base [2]*server, signer *iddoc.Signer, tlsCfg *tls.Config, doc, p7 string, many, single, rounds int, seq *int) error {
	st, err := store.Open(context.Background(), driver, dsn, zerolog.Nop())
	if err != nil {
		return err
	}
	defer st.Close()
	h := intake.NewHandler(intake.Options{Store: st, AWSCertificates: []*x509.Certificate{signer.Cert}, AllowedAccounts: []string{account}, Log: zerolog.Nop()})
	inSrv, err := serve(h, tlsCfg)
	if err != nil {
		return err
	}
	defer inSrv.close()
	in := &inSrv
	fmt.Printf("%s:\n", name)
	for _, client := range clients {
		if err := benchSenders(client, base, in, st, doc, p7, many, single, rounds, seq); err != nil {
			return err
		}
	}
	n, err := st.Len(context.Background())
	if err != nil {
		return err
	}
	counts := h.Counts()
	fmt.Printf("  stored %d fingerprints, %d accepted, %d duplicates, refused %v\n", n, counts.Accepted, counts.Duplicates, refusedTotal(counts))
	return nil
}

// benchSenders measures batches of 100 and of 1 from one client's senders.
func benchSenders(client *http.Client, base [2]*server, in *server, st *store.DB, doc, p7 string, many, single, rounds int, seq *int) error {
	for _, c := range []struct{ total, size int }{{many, 100}, {single, 1}} {
		var baseRates, sameRates, inRates []float64
		commits := st.Commits()
		for r := 0; r < rounds; r++ {
			bodies, err := makeBodies(doc, p7, c.total, c.size, seq)
			if err != nil {
				return err
			}
			rate, err := send(client, base[0].url, bodies, c.size, senders(client))
			if err != nil {
				return fmt.Errorf("baseline: %w", err)
			}
			baseRates = append(baseRates, rate)
			if rate, err = send(client, base[1].url, bodies, c.size, senders(client)); err != nil {
				return fmt.Errorf("baseline: %w", err)
			}
			sameRates = append(sameRates, rate)
			if rate, err = send(client, in.url, bodies, c.size, senders(client)); err != nil {
				return fmt.Errorf("intake: %w", err)
			}
			inRates = append(inRates, rate)
		}
		b, bs, i := median(baseRates), median(sameRates), median(inRates)
		perCommit := float64(c.total*rounds) / float64(max(1, st.Commits()-commits))
		fmt.Printf("  %2d senders, batches of %3d: decode-only baseline %8.0f fingerprints/s (one-pass decoder %8.0f); intake %8.0f fingerprints/s (%6.0f batches/s, %5.0f fingerprints per commit); ratio %.2f (%.2f against the one-pass baseline)\n",
			senders(client), c.size, b, bs, i, i/float64(c.size), perCommit, i/b, i/bs)
	}
	return nil
}

// senders is the number of concurrent senders the client was made for.
func senders(c *http.Client) int { return c.Transport.(*http.Transport).MaxIdleConnsPerHost }

func refusedTotal(c intake.Counts) int64 {
	var n int64
	for _, v := range c.Refused {
		n += v
	}
	return n
}

// decodeOnly is the baseline: the same size cap and strict decoding, nothing else.
func decodeOnly(w http.ResponseWriter, r *http.Request) {
	var b intake.Batch
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, intake.MaxBodyBytes))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		http.Error(w, `{"error":"decode"}`, http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, "{\"accepted\":%d,\"duplicates\":0}\n", len(b.Fingerprints))
}

// decodeSame is the baseline with the intake's own decoder.
func decodeSame(w http.ResponseWriter, r *http.Request) {
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, intake.MaxBodyBytes))
	if err != nil {
		http.Error(w, `{"error":"read"}`, http.StatusBadRequest)
		return
	}
	b, _, err := intake.DecodeBatch(data)
	if err != nil {
		http.Error(w, `{"error":"decode"}`, http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, "{\"accepted\":%d,\"duplicates\":0}\n", len(b.Fingerprints))
}

func makeBodies(doc, p7 string, total, size int, seq *int) ([][]byte, error) {
	now := time.Now().UTC().Truncate(time.Second)
	var bodies [][]byte
	for done := 0; done < total; done += size {
		fps := make([]wire.Fingerprint, size)
		for i := range fps {
			*seq++
			fps[i] = wire.Fingerprint{
				ID: fmt.Sprintf("%032x", *seq), AccessKeyID: fmt.Sprintf("ASIABENCH%011d", *seq), Role: "web",
				InstanceProfileARN: "arn:aws:iam::" + account + ":instance-profile/web",
				LastUpdated:        now, Expiration: now.Add(6 * time.Hour),
				Instance:      wire.Instance{ID: instance, AccountID: account, Region: "us-east-1", AvailabilityZone: "us-east-1a"},
				HostAddresses: []netip.Addr{netip.MustParseAddr("10.0.0.5"), netip.MustParseAddr("54.0.0.5")},
				Process:       wire.Process{PID: 1000 + *seq%5000, Exe: "/usr/bin/python3", User: "app", Unit: "app.service"},
				IMDSVersion:   "v2", TokenHMAC: fmt.Sprintf("%064x", *seq),
			}
		}
		body, err := json.Marshal(intake.Batch{Document: doc, PKCS7: p7, BatchID: fmt.Sprint(*seq), Fingerprints: fps})
		if err != nil {
			return nil, err
		}
		bodies = append(bodies, body)
	}
	return bodies, nil
}

// send posts every body with senders concurrent clients and returns fingerprints/s.
func send(client *http.Client, url string, bodies [][]byte, size, senders int) (float64, error) {
	next := make(chan []byte, len(bodies))
	for _, b := range bodies {
		next <- b
	}
	close(next)
	var wg sync.WaitGroup
	errs := make(chan error, senders)
	start := time.Now()
	for s := 0; s < senders; s++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for body := range next {
				resp, err := client.Post(url, "application/json", bytes.NewReader(body))
				if err != nil {
					errs <- err
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					errs <- fmt.Errorf("status %d", resp.StatusCode)
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	select {
	case err := <-errs:
		return 0, err
	default:
	}
	return float64(len(bodies)*size) / elapsed.Seconds(), nil
}

func serve(h http.Handler, cfg *tls.Config) (server, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return server{}, fmt.Errorf("listen: %w", err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(tls.NewListener(ln, cfg))
	return server{url: "https://" + ln.Addr().String() + "/v1/fingerprints", close: func() { srv.Close() }}, nil
}

// loopbackTLS makes a self-signed server certificate for 127.0.0.1.
func loopbackTLS() (*tls.Config, *x509.CertPool, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate tls key: %w", err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "bench-intake"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, fmt.Errorf("create tls certificate: %w", err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("encode tls key: %w", err)
	}
	pair, err := tls.X509KeyPair(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}))
	if err != nil {
		return nil, nil, fmt.Errorf("load tls key pair: %w", err)
	}
	cert, _ := x509.ParseCertificate(der)
	roots := x509.NewCertPool()
	roots.AddCert(cert)
	return &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}, roots, nil
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}
