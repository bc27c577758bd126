// Command bench-replicas measures serve consuming an organisation trail from SQS: the
// records per second of one replica, then of two replicas sharing one queue and one
// PostgreSQL, in one run. The queue and the bucket are the tests' local stand-ins
// (sqstest, trailwatchtest) speaking the SDK's wire protocols; PostgreSQL is a real
// server started for the run (pgtest). Both replicas run in this process, so they share
// its cores as two processes on one machine would.
//
//	go run ./tools/bench-replicas [-objects 40] [-records 5000] [-instances 500]
package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"flag"
	"fmt"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/imdsguard/imdsguard/internal/correlator"
	"github.com/imdsguard/imdsguard/internal/correlator/trailqueue/sqstest"
	"github.com/imdsguard/imdsguard/internal/correlator/trailwatch/trailwatchtest"
	"github.com/imdsguard/imdsguard/internal/testing/ctcorpus"
	"github.com/imdsguard/imdsguard/internal/testing/pgtest"
	"github.com/imdsguard/imdsguard/internal/testing/syncbuf"
)

func main() {
	objects := flag.Int("objects", 40, "CloudTrail objects (one notification each)")
	records := flag.Int("records", 5000, "records per object")
	instances := flag.Int("instances", 500, "instances per object")
	flag.Parse()
	if err := run(*objects, *records, *instances); err != nil {
		fmt.Fprintf(os.Stderr, "bench-replicas: %v\n", err)
		os.Exit(1)
	}
}

func run(objects, records, instances int) error {
	pg, err := pgtest.Start()
	if err != nil {
		return err
	}
	defer pg.Stop()
	dir, err := os.MkdirTemp("", "bench-replicas")
	if err != nil {
		return fmt.Errorf("create temp dir: %w", err)
	}
	defer os.RemoveAll(dir)
	for k, v := range map[string]string{"AWS_ACCESS_KEY_ID": trailwatchtest.AccessKeyID, "AWS_SECRET_ACCESS_KEY": "secret", "AWS_EC2_METADATA_DISABLED": "true",
		"AWS_CONFIG_FILE": filepath.Join(dir, "none"), "AWS_SHARED_CREDENTIALS_FILE": filepath.Join(dir, "none")} {
		os.Setenv(k, v)
	}
	bucket := trailwatchtest.NewS3("trail")
	var keys []string
	for i := range objects {
		var raw bytes.Buffer
		if _, err := ctcorpus.Large(&raw, records, instances, int64(i+1)); err != nil {
			return err
		}
		var gz bytes.Buffer
		zw := gzip.NewWriter(&gz)
		zw.Write(raw.Bytes())
		if err := zw.Close(); err != nil {
			return err
		}
		key := fmt.Sprintf("AWSLogs/o-bench/111111111111/CloudTrail/us-east-1/2026/11/20/111111111111_CloudTrail_us-east-1_20261120T%04dZ_%03d.json.gz", i, i)
		bucket.Put(key, gz.String())
		keys = append(keys, key)
	}
	s3srv := httptest.NewServer(bucket)
	defer s3srv.Close()
	total := objects * records
	fmt.Printf("replicas: %d objects of %d records (gzip), SQS and S3 stand-ins on loopback, PostgreSQL on a unix socket\n", objects, records)
	var one float64
	for _, n := range []int{1, 2} {
		rate, err := measure(pg, s3srv.URL, keys, records, n, dir)
		if err != nil {
			return err
		}
		if n == 1 {
			one = rate
		}
		fmt.Printf("%d replica(s): %8.0f records/s (%.2f× one replica), %d records\n", n, rate, rate/one, total)
	}
	return nil
}

// measure runs n replicas until the queue of every key is empty and returns records/s.
func measure(pg *pgtest.Server, s3URL string, keys []string, records, n int, dir string) (float64, error) {
	dsn, err := pg.NewDatabase(context.Background())
	if err != nil {
		return 0, err
	}
	queue := &sqstest.Queue{MaxReceiveCount: 5}
	for _, k := range keys {
		queue.Send(fmt.Sprintf(`{"Records":[{"eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"trail"},"object":{"key":%q}}}]}`, k))
	}
	qsrv := httptest.NewServer(queue)
	defer qsrv.Close()
	cfg := filepath.Join(dir, fmt.Sprintf("c%d.yaml", n))
	body := "serve:\n  s3:\n    endpoint: " + s3URL + "\n    path_style: true\n" +
		"  sqs:\n    queue_url: " + qsrv.URL + "/111111111111/trail\n    endpoint: " + qsrv.URL + "\n    visibility_timeout: 10m\n" +
		"  poll_interval: 100ms\nstore:\n  driver: postgres\n  dsn: \"" + dsn + "\"\nlog:\n  level: warn\n"
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		return 0, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]syncbuf.Buffer, n)
	codes := make([]int, n)
	start := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			codes[i] = correlator.Run(ctx, "", []string{"serve", "--config", cfg}, nil, io.Discard, &errs[i])
		}()
	}
	deadline := time.Now().Add(10 * time.Minute)
	for queue.Len() > 0 {
		if time.Now().After(deadline) {
			cancel()
			wg.Wait()
			return 0, fmt.Errorf("%d replicas: %d messages left after 10m: %s", n, queue.Len(), errs[0].String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	took := time.Since(start)
	cancel()
	wg.Wait()
	for i, c := range codes {
		if c != 0 {
			return 0, fmt.Errorf("replica %d exited %d: %s", i, c, errs[i].String())
		}
	}
	if d := queue.Dead(); len(d) > 0 {
		return 0, fmt.Errorf("%d messages went to the dead-letter list", len(d))
	}
	return float64(len(keys)*records) / took.Seconds(), nil
}
