package metrics

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/cloudwatch"
	"github.com/aws/aws-sdk-go-v2/service/cloudwatch/types"
	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/hostid"
	"github.com/imdsguard/imdsguard/internal/retry"
)

// PutMetricData limits (CloudWatch API reference): at most 1000 metrics and 1 MB per
// request, data points at most two weeks old. The byte budget leaves room for the
// envelope and for our estimate being rough.
const (
	maxDatumsPerRequest = 1000
	maxBytesPerRequest  = 800 << 10
	maxDatumAge         = 14 * 24 * time.Hour
)

// CloudWatchOptions shape the CloudWatch sink.
type CloudWatchOptions struct {
	Namespace string
	// Region is fixed by config; "" takes the instance's region once identity knows it
	// (nothing is sent before that, data waits in the bounded queue).
	Region string
	// Endpoint overrides the service endpoint (VPC endpoint, local stand-in).
	Endpoint string
	// HTTPClient, when set, carries every request (credentials included): the agent
	// passes one whose sockets the broker does not redirect.
	HTTPClient *http.Client
	// Credentials, when set, replace the standard chain (tests).
	Credentials aws.CredentialsProvider
	// MaxPending bounds the data points queued while CloudWatch is unreachable; the
	// oldest are dropped first. Default 50000 (about 10 MB).
	MaxPending int
	// FirstBackoff and MaxBackoff space the retries of a failed send (defaults 5s, 5m).
	FirstBackoff, MaxBackoff time.Duration
	// RetryMaxAttempts is the SDK's own attempts per send (default 3).
	RetryMaxAttempts int
	Log              zerolog.Logger
}

// CloudWatch sends each interval with PutMetricData from a background goroutine:
// Publish only queues, so a slow or absent endpoint never holds up the agent.
type CloudWatch struct {
	opts CloudWatchOptions

	mu      sync.Mutex
	pending []queued
	nextSeq uint64
	region  string // from config or identity; "" until known
	dropped uint64
	drops   int // times data was dropped, to warn at doublings only
	client  *cloudwatch.Client
	clReg   string

	wake chan struct{}
	quit chan struct{}      // closed by Close: finish the send in flight, then stop
	stop context.CancelFunc // abandons the send in flight, when Close runs out of time
	done chan struct{}
}

type queued struct {
	seq   uint64
	datum types.MetricDatum
}

// NewCloudWatch starts the sender.
func NewCloudWatch(opts CloudWatchOptions) *CloudWatch {
	if opts.MaxPending <= 0 {
		opts.MaxPending = 50000
	}
	if opts.FirstBackoff <= 0 {
		opts.FirstBackoff = 5 * time.Second
	}
	if opts.MaxBackoff < opts.FirstBackoff {
		opts.MaxBackoff = max(5*time.Minute, opts.FirstBackoff)
	}
	if opts.RetryMaxAttempts <= 0 {
		opts.RetryMaxAttempts = 3
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &CloudWatch{opts: opts, region: opts.Region, wake: make(chan struct{}, 1), stop: cancel,
		quit: make(chan struct{}), done: make(chan struct{})}
	go c.run(ctx)
	return c
}

// Name implements Sink.
func (c *CloudWatch) Name() string { return "cloudwatch" }

// Pending returns how many data points wait to be sent, and how many were dropped
// because the queue was full.
func (c *CloudWatch) Pending() (pending int, dropped uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.pending), c.dropped
}

// Publish implements Sink: it queues the interval's data points.
func (c *CloudWatch) Publish(_ context.Context, s Snapshot, id hostid.Identity, known bool) error {
	ds := Datums(s, id, known)
	c.mu.Lock()
	if c.region == "" && known {
		c.region = id.Region
	}
	for _, d := range ds {
		c.pending = append(c.pending, queued{seq: c.nextSeq, datum: d})
		c.nextSeq++
	}
	warn := false
	if over := len(c.pending) - c.opts.MaxPending; over > 0 {
		c.dropped += uint64(over)
		c.pending = append(c.pending[:0:0], c.pending[over:]...)
		c.drops++
		warn = c.drops&(c.drops-1) == 0
	}
	dropped := c.dropped
	c.mu.Unlock()
	if warn {
		c.opts.Log.Warn().Str("event", "metrics_dropped").Str("sink", "cloudwatch").Uint64("dropped_total", dropped).
			Int("max_pending", c.opts.MaxPending).
			Msg("CloudWatch unreachable for long: oldest data points dropped to bound memory")
	}
	select {
	case c.wake <- struct{}{}:
	default:
	}
	return nil
}

// Datums turns an interval into CloudWatch data points: every kind per instance (zeros
// included, so that alarms on "no IMDSv1" see data), and the non-zero per-process kinds
// per executable, per user and per container. Without the identity, the InstanceId dimension is left
// out rather than invented.
func Datums(s Snapshot, id hostid.Identity, known bool) []types.MetricDatum {
	var base []types.Dimension
	if known {
		base = []types.Dimension{{Name: aws.String(DimInstanceID), Value: aws.String(id.InstanceID)}}
	}
	ts := s.End
	datum := func(k Kind, v uint64, dims []types.Dimension) types.MetricDatum {
		return types.MetricDatum{MetricName: aws.String(k.String()), Dimensions: dims,
			Timestamp: aws.Time(ts), Value: aws.Float64(float64(v)), Unit: types.StandardUnitCount}
	}
	var out []types.MetricDatum
	for _, k := range Kinds() {
		out = append(out, datum(k, s.Totals[k], base))
	}
	for _, group := range s.groups() {
		for _, sr := range group.series {
			dims := append(append([]types.Dimension{}, base...),
				types.Dimension{Name: aws.String(group.dim), Value: aws.String(sr.Value)})
			for _, k := range nonZeroPerProcess(sr.Counts) {
				out = append(out, datum(k, sr.Counts[k], dims))
			}
		}
	}
	return out
}

func (c *CloudWatch) run(ctx context.Context) {
	defer close(c.done)
	backoff := retry.Backoff{Min: c.opts.FirstBackoff, Max: c.opts.MaxBackoff}
	failures := 0
	var retry <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.quit:
			return
		case <-c.wake:
			if retry != nil {
				continue // a failed send waits out its backoff, new data or not
			}
		case <-retry:
			retry = nil
		}
		err := c.sendAll(ctx)
		switch {
		case err == nil:
			if failures > 0 {
				c.opts.Log.Info().Str("event", "cloudwatch_recovered").Int("failures", failures).
					Msg("CloudWatch PutMetricData works again")
			}
			backoff.Reset()
			failures = 0
		case ctx.Err() != nil:
			return
		default:
			failures++
			wait := backoff.Next()
			if failures&(failures-1) == 0 {
				pending, dropped := c.Pending()
				c.opts.Log.Warn().Str("event", "cloudwatch_put_failed").Err(err).Int("failures", failures).
					Int("pending", pending).Uint64("dropped", dropped).Dur("retry_in", wait).
					Msg("cannot send metrics to CloudWatch; keeping them and retrying")
			}
			retry = time.After(wait)
		}
	}
}

var errNoRegion = errors.New("no region yet: neither metrics.cloudwatch.region nor the instance identity")

// sendAll sends batches until the queue is empty or a send fails.
func (c *CloudWatch) sendAll(ctx context.Context) error {
	for {
		batch, last := c.nextBatch()
		if len(batch) == 0 {
			return nil
		}
		client, err := c.clientFor(ctx)
		if err != nil {
			return err
		}
		_, err = client.PutMetricData(ctx, &cloudwatch.PutMetricDataInput{
			Namespace: aws.String(c.opts.Namespace), MetricData: batch,
		})
		if err != nil {
			return fmt.Errorf("put metric data (%d data points): %w", len(batch), err)
		}
		c.mu.Lock()
		i := 0
		for i < len(c.pending) && c.pending[i].seq <= last {
			i++
		}
		c.pending = append(c.pending[:0:0], c.pending[i:]...)
		c.mu.Unlock()
	}
}

// nextBatch takes the oldest data points that fit one request, skipping (and counting
// as dropped) those CloudWatch would refuse as too old.
func (c *CloudWatch) nextBatch() ([]types.MetricDatum, uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cutoff := time.Now().Add(-maxDatumAge)
	for len(c.pending) > 0 && c.pending[0].datum.Timestamp.Before(cutoff) {
		c.pending = c.pending[1:]
		c.dropped++
	}
	var batch []types.MetricDatum
	var last uint64
	size := 0
	for _, q := range c.pending {
		n := datumSize(q.datum)
		if len(batch) == maxDatumsPerRequest || (len(batch) > 0 && size+n > maxBytesPerRequest) {
			break
		}
		batch = append(batch, q.datum)
		last, size = q.seq, size+n
	}
	return batch, last
}

// datumSize overestimates a data point's encoded size: its strings plus a fixed
// allowance for keys, the value, the unit and the timestamp.
func datumSize(d types.MetricDatum) int {
	n := 96 + len(aws.ToString(d.MetricName))
	for _, dim := range d.Dimensions {
		n += 24 + len(aws.ToString(dim.Name)) + len(aws.ToString(dim.Value))
	}
	return n
}

func (c *CloudWatch) clientFor(ctx context.Context) (*cloudwatch.Client, error) {
	c.mu.Lock()
	region := c.region
	if c.client != nil && c.clReg == region {
		defer c.mu.Unlock()
		return c.client, nil
	}
	c.mu.Unlock()
	if region == "" {
		return nil, errNoRegion
	}
	load := []func(*awsconfig.LoadOptions) error{
		awsconfig.WithRegion(region),
		awsconfig.WithRetryMaxAttempts(c.opts.RetryMaxAttempts),
	}
	if c.opts.HTTPClient != nil {
		// The SDK wants a client it can still configure (custom CA bundles): keep its
		// buildable client and give it only our dialer.
		if tr, ok := c.opts.HTTPClient.Transport.(*http.Transport); ok && tr.DialContext != nil {
			load = append(load, awsconfig.WithHTTPClient(awshttp.NewBuildableClient().WithTransportOptions(
				func(t *http.Transport) { t.DialContext = tr.DialContext })))
		} else {
			load = append(load, awsconfig.WithHTTPClient(c.opts.HTTPClient))
		}
	}
	if c.opts.Credentials != nil {
		load = append(load, awsconfig.WithCredentialsProvider(c.opts.Credentials))
	}
	cfg, err := awsconfig.LoadDefaultConfig(ctx, load...)
	if err != nil {
		return nil, fmt.Errorf("load AWS configuration: %w", err)
	}
	client := cloudwatch.NewFromConfig(cfg, func(o *cloudwatch.Options) {
		if c.opts.Endpoint != "" {
			o.BaseEndpoint = aws.String(c.opts.Endpoint)
		}
	})
	c.mu.Lock()
	c.client, c.clReg = client, region
	c.mu.Unlock()
	return client, nil
}

// Close implements Sink: it stops the background sender and makes one last attempt to
// send everything queued, within ctx.
func (c *CloudWatch) Close(ctx context.Context) error {
	// Cancelling a PutMetricData mid-body would lose it and leave CloudWatch a cut
	// request: let the send in flight finish, unless ctx runs out first.
	close(c.quit)
	select {
	case <-c.done:
	case <-ctx.Done():
		c.stop()
		<-c.done
	}
	c.stop()
	if err := c.sendAll(ctx); err != nil {
		pending, _ := c.Pending()
		return fmt.Errorf("cloudwatch: %d data points not sent at shutdown: %w", pending, err)
	}
	return nil
}
