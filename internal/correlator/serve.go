package correlator

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/cli"
	"github.com/imdsguard/imdsguard/internal/correlator/cloudtrail"
	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/correlator/ipranges"
	"github.com/imdsguard/imdsguard/internal/correlator/outputs"
	"github.com/imdsguard/imdsguard/internal/correlator/store"
	"github.com/imdsguard/imdsguard/internal/correlator/trailqueue"
	"github.com/imdsguard/imdsguard/internal/correlator/trailwatch"
	"github.com/imdsguard/imdsguard/internal/retry"
)

// component is one part of serve that runs until ctx ends: detection, and the
// fingerprint intake (HTTPS API filling the store that detection reads).
type component interface {
	Name() string
	Run(ctx context.Context) error
}

func cmdServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fl := flag.NewFlagSet("serve", flag.ContinueOnError)
	fl.SetOutput(io.Discard)
	cfgPath := fl.String("config", "", "config file")
	fpPath := fl.String("fingerprints", "", "JSON-lines file of host fingerprints")
	if err := fl.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", cli.ErrUsage, err)
	}
	if *cfgPath == "" || fl.NArg() > 0 {
		return fmt.Errorf("%w: serve takes --config and no arguments", cli.ErrUsage)
	}
	e, err := load(*cfgPath, *fpPath, stderr)
	if err != nil {
		return err
	}
	defer e.close()
	db, err := openStore(ctx, e)
	if err != nil {
		return err
	}
	if db != nil {
		defer func() {
			if err := db.Close(); err != nil {
				e.log.Error().Err(err).Str("event", "store_close_failed").Msg("closing the database")
			}
		}()
	}
	var cs []component
	// The intake comes first: detection reads the store it fills.
	if e.cfg.Intake.Listen != "" {
		in, err := newIntake(e, db)
		if err != nil {
			return err
		}
		cs = append(cs, in)
	}
	if len(cs) == 0 || e.cfg.Serve.Directory != "" || e.cfg.Serve.S3.Bucket != "" || e.cfg.Serve.SQS.QueueURL != "" {
		det, err := newDetection(ctx, e, stdout, db)
		if err != nil {
			return err
		}
		cs = append(cs, det)
		if len(e.cfg.Inventory.EC2.Regions) > 0 {
			if det.inventory, err = newInventoryPoller(ctx, e); err != nil {
				return err
			}
			cs = append(cs, det.inventory)
		}
	}
	e.log.Info().Str("event", "correlator_starting").Str("version", versionString()).Str("config", *cfgPath).Msg("starting")
	return runComponents(ctx, e.log, cs...)
}

// runComponents runs every component and stops them all when one fails.
func runComponents(ctx context.Context, log zerolog.Logger, cs ...component) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, len(cs))
	for i, c := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.Run(ctx); err != nil {
				log.Error().Str("event", "component_failed").Str("component", c.Name()).Err(err).Msg("component stopped with an error")
				errs[i] = fmt.Errorf("%s: %w", c.Name(), err)
				cancel()
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// detection follows the configured log sources, feeds the detector and emits findings
// that are new or whose counts grew.
type detection struct {
	e         *env
	det       *detector.Detector
	followers []*trailwatch.Follower
	queue     *trailqueue.Consumer
	// state, when set, keeps the detector's snapshot and the checkpoint in the
	// database after every cycle, so that a restart goes on counting.
	state      *store.DB
	checkpoint *trailwatch.Checkpoint
	// shared, for replicas on a queue and PostgreSQL, shares the detector's state
	// between them; delta then takes this cycle's records (see sharedState).
	backoff     retry.Backoff // between failed cycles
	unpublished bool          // the last publish failed: the next cycle publishes
	shared      *sharedState
	delta       *detector.Detector
	deltaLatest time.Time
	objects     []trailqueue.Object // read into delta, recorded with it
	out         *outputs.Dispatcher
	interval    time.Duration
	latest      time.Time // latest event time seen
	rangesMod   time.Time
	stats       cloudtrail.Stats
	inventory   *inventoryPoller // nil without inventory.ec2
}

func newDetection(ctx context.Context, e *env, stdout io.Writer, db *store.DB) (*detection, error) {
	cfg := e.cfg
	if cfg.Serve.Directory == "" && cfg.Serve.S3.Bucket == "" && cfg.Serve.SQS.QueueURL == "" {
		return nil, fmt.Errorf("serve needs serve.directory, serve.s3.bucket, serve.sqs.queue_url or intake.listen in the config")
	}
	cp, err := trailwatch.LoadCheckpoint(cfg.Serve.Checkpoint)
	if err != nil {
		return nil, err
	}
	if cfg.Serve.Checkpoint == "" {
		e.log.Warn().Str("event", "no_checkpoint").Msg("serve.checkpoint is not set: a restart reads every file again")
	}
	out, err := newDispatcher(ctx, e, stdout, ledger(db))
	if err != nil {
		return nil, err
	}
	d := &detection{e: e, det: e.detector(""), out: out, interval: cfg.Serve.PollInterval,
		backoff: retry.Backoff{Min: cfg.Serve.PollInterval, Max: 30 * time.Second}}
	if cfg.IPRanges != "" {
		if info, err := os.Stat(cfg.IPRanges); err == nil {
			d.rangesMod = info.ModTime()
		}
	}
	var listers []trailwatch.Lister
	if cfg.Serve.Directory != "" {
		listers = append(listers, &trailwatch.Dir{Root: cfg.Serve.Directory, Settle: time.Second})
	}
	if b := cfg.Serve.S3; b.Bucket != "" {
		client, err := newS3Client(ctx, cfg.Serve.S3.Region, b.Endpoint, b.PathStyle)
		if err != nil {
			return nil, err
		}
		listers = append(listers, &trailwatch.S3{Client: client, Bucket: b.Bucket, Prefix: b.Prefix})
	}
	if q := cfg.Serve.SQS; q.QueueURL != "" {
		s3c, err := newS3Client(ctx, cfg.Serve.S3.Region, cfg.Serve.S3.Endpoint, cfg.Serve.S3.PathStyle)
		if err != nil {
			return nil, err
		}
		awsCfg, err := awsconfig.LoadDefaultConfig(ctx, awsconfig.WithRegion(q.Region))
		if err != nil {
			return nil, fmt.Errorf("load aws config: %w", err)
		}
		sqsc := sqs.NewFromConfig(awsCfg, func(o *sqs.Options) {
			if q.Endpoint != "" {
				o.BaseEndpoint = aws.String(q.Endpoint)
			}
		})
		// The long poll is serve's wait between cycles.
		d.queue = &trailqueue.Consumer{SQS: sqsc, S3: s3c, QueueURL: q.QueueURL, VisibilityTimeout: q.VisibilityTimeout,
			Wait: min(cfg.Serve.PollInterval, 20*time.Second), MaxObjectBytes: maxObjectBytes, Read: d.read, Log: e.log}
	}
	for _, l := range listers {
		d.followers = append(d.followers, &trailwatch.Follower{Lister: l, Checkpoint: cp, Read: d.read, Log: e.log})
	}
	if db != nil && d.queue != nil {
		// On SQLite a single replica keeps its state the same way: a turn records
		// the objects read with their counts, so neither a restart nor a redelivered
		// message counts an object twice.
		d.shared, d.delta = &sharedState{db: db, applied: -1}, e.detector("")
		d.queue.Counted = d.shared.counted
	}
	if db != nil && d.queue == nil {
		d.state, d.checkpoint = db, cp
		if err := d.restore(ctx); err != nil {
			return nil, err
		}
	}
	return d, nil
}

func newS3Client(ctx context.Context, region, endpoint string, pathStyle bool) (*s3.Client, error) {
	awsCfg, err := awsconfig.LoadDefaultConfig(ctx, awsconfig.WithRegion(region))
	if err != nil {
		return nil, fmt.Errorf("load aws config: %w", err)
	}
	return s3.NewFromConfig(awsCfg, func(o *s3.Options) {
		if endpoint != "" {
			o.BaseEndpoint = aws.String(endpoint)
		}
		o.UsePathStyle = pathStyle
		o.DisableLogOutputChecksumValidationSkipped = true
	}), nil
}

func newHTTPClient(timeout time.Duration) *http.Client {
	return &http.Client{Timeout: timeout}
}

// maxObjectBytes bounds a CloudTrail object read from a notification; CloudTrail
// delivers files far smaller (a gzip file of at most a few MB).
const maxObjectBytes = 512 << 20

// Name implements component.
func (d *detection) Name() string { return "detection" }

func (d *detection) read(name string, r io.Reader) error {
	logged := 0
	st := cloudtrail.Read(name, r, func(rec *cloudtrail.Record, _ cloudtrail.Pos) {
		d.observer().Observe(rec)
		if d.shared != nil {
			d.deltaLatest = maxTime(d.deltaLatest, rec.Time)
		} else if rec.Time.After(d.latest) {
			d.latest = rec.Time
		}
	}, func(p cloudtrail.Problem) {
		if logged++; logged <= maxProblemLogs || p.Truncated {
			d.e.log.Warn().Str("event", map[bool]string{true: "file_truncated", false: "record_skipped"}[p.Truncated]).
				Str("file", p.File).Int64("index", p.Index).Int64("offset", p.Offset).Err(p.Err).Msg("bad input")
		}
	})
	d.stats.Add(st)
	d.e.log.Info().Str("event", "log_file_read").Str("file", name).Int64("records", st.Records).Int64("malformed", st.Malformed).Bool("truncated", st.Truncated).Msg("read log file")
	return nil
}

// Run implements component: poll, judge, publish, forget, every poll interval. When
// it stops, the outputs get serve's shutdown grace to deliver what is queued.
func (d *detection) Run(ctx context.Context) (err error) {
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), d.e.cfg.Outputs.ShutdownGrace)
		defer cancel()
		if cerr := d.out.Close(cctx); cerr != nil {
			d.e.log.Error().Str("event", "outputs_cut_short").Err(cerr).Msg("findings left undelivered at shutdown")
		}
	}()
	t := time.NewTicker(d.interval)
	defer t.Stop()
	for {
		if err := d.cycle(ctx); err != nil {
			return err
		}
		if d.queue != nil { // the queue's long poll was the wait
			if ctx.Err() != nil {
				return nil
			}
			continue
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func (d *detection) cycle(ctx context.Context) error {
	d.reloadRanges()
	d.applyInventory()
	read := 0
	for _, f := range d.followers {
		n, err := f.Poll(ctx)
		read += n
		if err != nil && ctx.Err() == nil {
			d.e.log.Error().Str("event", "poll_failed").Str("source", f.Lister.ID()).Err(err).Msg("polling log files failed; retrying next interval")
		}
	}
	published := false
	if d.queue != nil {
		// The queue's messages are deleted only after publish has recorded their
		// findings.
		var recordErr error
		n, err := d.queue.Poll(ctx, func(ctx context.Context, objs []trailqueue.Object) error {
			published = true
			d.objects = append(d.objects, objs...)
			recordErr = d.publish(ctx, read+len(objs))
			return recordErr
		})
		read += n
		if err != nil && ctx.Err() == nil {
			wait := d.backoff.Next()
			if recordErr != nil {
				// The database is down or restarting: nothing of this cycle counts,
				// and its messages come back after the visibility timeout.
				d.e.log.Error().Str("event", "record_failed").Str("queue", d.queue.QueueURL).Err(recordErr).Dur("retry_in", wait).
					Msg("recording findings failed: the messages stay on the queue and are read again; retrying")
			} else {
				d.e.log.Error().Str("event", "queue_poll_failed").Str("queue", d.queue.QueueURL).Err(err).Dur("retry_in", wait).
					Msg("receiving from the queue failed; retrying")
			}
			if !published && read > 0 {
				return d.publish(ctx, read)
			}
			// Not a busy loop against a queue or a database that is down.
			_ = retry.Sleep(ctx, wait)
			return nil
		}
		d.backoff.Reset()
	}
	if (read == 0 && !d.unpublished) || published {
		return nil
	}
	// The files read stay in the detector (and the checkpoint in memory) when the
	// database is down: their findings and state are recorded by a later cycle.
	if err := d.publish(ctx, read); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		d.unpublished = true
		wait := d.backoff.Next()
		d.e.log.Error().Str("event", "record_failed").Err(err).Dur("retry_in", wait).
			Msg("recording findings failed: kept in memory; retrying")
		_ = retry.Sleep(ctx, wait)
		return nil
	}
	d.unpublished = false
	d.backoff.Reset()
	return nil
}

// publish claims and queues the findings that are new or grew, then lets the detector
// forget what is too old to change.
func (d *detection) publish(ctx context.Context, files int) error {
	if d.shared != nil {
		return d.publishShared(ctx, files)
	}
	changed, err := d.out.Publish(ctx, d.det.Findings(), time.Now())
	if err != nil {
		return err
	}
	// Keep two windows of history behind the newest record: late files still count.
	horizon := d.latest.Add(-2 * d.e.cfg.Window)
	d.det.Forget(horizon)
	// A finding whose window ended before the horizon cannot change again.
	if err := d.out.Forget(ctx, horizon.Add(-d.e.cfg.Window)); err != nil {
		return err
	}
	if err := d.save(ctx); err != nil {
		return err
	}
	d.e.log.Info().Str("event", "detect_cycle").Int("files", files).Int("changed_findings", len(changed)).Int64("records", d.stats.Records).
		Int64("malformed", d.stats.Malformed).Int("groups", d.det.Stats().Groups).Msg("detection cycle")
	return nil
}

// reloadRanges picks up a new ip-ranges.json (installed by update-ip-ranges).
func (d *detection) reloadRanges() {
	p := d.e.cfg.IPRanges
	if p == "" {
		return
	}
	info, err := os.Stat(p)
	if err != nil || info.ModTime().Equal(d.rangesMod) {
		return
	}
	set, err := ipranges.Load(p)
	if err != nil {
		d.e.log.Error().Str("event", "ip_ranges_reload_failed").Err(err).Msg("keeping the ranges loaded before")
		return
	}
	d.rangesMod = info.ModTime()
	d.det.SetRanges(set)
	d.e.log.Info().Str("event", "ip_ranges_reloaded").Int("prefixes", set.Len()).Str("sync_token", set.SyncToken).Msg("reloaded ip ranges")
}
