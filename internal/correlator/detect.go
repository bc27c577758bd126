package correlator

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/cloudwatch"

	"github.com/imdsguard/imdsguard/internal/cli"
	"github.com/imdsguard/imdsguard/internal/correlator/config"
	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/correlator/investigate"
	"github.com/imdsguard/imdsguard/internal/correlator/outputs"
)

func cmdDetect(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fl := flag.NewFlagSet("detect", flag.ContinueOnError)
	fl.SetOutput(io.Discard)
	cfgPath := fl.String("config", "", "config file")
	fpPath := fl.String("fingerprints", "", "JSON-lines file of host fingerprints")
	var invPaths fileList
	fl.Var(&invPaths, "inventory", "AWS CLI output of describe-network-interfaces, describe-addresses, describe-vpc-endpoints or lambda list-functions (repeatable)")
	if err := fl.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", cli.ErrUsage, err)
	}
	prog := newProgress(stderr)
	e, err := load(*cfgPath, *fpPath, prog.logWriter(stderr))
	if err != nil {
		return err
	}
	defer e.close()
	if err := e.addInventory(invPaths); err != nil {
		return err
	}
	d := e.detector("")
	start := time.Now()
	prog.begin(fl.Args(), stderr)
	st, truncated, readErr := readInputs(ctx, fl.Args(), stdin, e.log, prog, d.Observe)
	prog.finish()
	all := d.Findings()
	var dropped int64
	for _, n := range d.Dropped() {
		dropped += n
	}
	out, err := newEmitter(ctx, e.cfg.Outputs, stdout, e)
	if err != nil {
		return err
	}
	if err := out.emit(ctx, all, all); err != nil {
		return err
	}
	flagged := 0
	for _, f := range all {
		if !f.Suppressed {
			flagged++
		}
	}
	e.log.Info().Str("event", "detect_done").Int64("records", st.Records).Int64("malformed", st.Malformed).Int("truncated_files", truncated).
		Int64("dropped", dropped).Int("findings", flagged).Int("suppressed", len(all)-flagged).Dur("took", time.Since(start)).Msg("detection finished")
	return readErr
}

func cmdInvestigate(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fl := flag.NewFlagSet("investigate", flag.ContinueOnError)
	fl.SetOutput(io.Discard)
	cfgPath := fl.String("config", "", "config file")
	fpPath := fl.String("fingerprints", "", "JSON-lines file of host fingerprints")
	var invPaths fileList
	fl.Var(&invPaths, "inventory", "AWS CLI output of describe-network-interfaces, describe-addresses, describe-vpc-endpoints or lambda list-functions (repeatable)")
	key := fl.String("access-key", "", "access key id to investigate")
	format := fl.String("format", "text", "text or json")
	if err := fl.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", cli.ErrUsage, err)
	}
	if *key == "" {
		return fmt.Errorf("%w: investigate needs --access-key", cli.ErrUsage)
	}
	if *format != "text" && *format != "json" {
		return fmt.Errorf("%w: --format must be text or json", cli.ErrUsage)
	}
	prog := newProgress(stderr)
	e, err := load(*cfgPath, *fpPath, prog.logWriter(stderr))
	if err != nil {
		return err
	}
	defer e.close()
	if err := e.addInventory(invPaths); err != nil {
		return err
	}
	d := e.detector(*key)
	prog.begin(fl.Args(), stderr)
	_, _, readErr := readInputs(ctx, fl.Args(), stdin, e.log, prog, d.Observe)
	prog.finish()
	story := investigate.Build(d, *key)
	if *format == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(story); err != nil {
			return fmt.Errorf("write story: %w", err)
		}
	} else if err := investigate.WriteText(stdout, story); err != nil {
		return fmt.Errorf("write story: %w", err)
	}
	return readErr
}

// emitter sends findings to stdout (JSON lines) and the configured outputs.
type emitter struct {
	cfg     config.Outputs
	stdout  io.Writer
	webhook *outputs.Webhook
	cw      *outputs.CloudWatch
	e       *env
}

func newEmitter(ctx context.Context, cfg config.Outputs, stdout io.Writer, e *env) (*emitter, error) {
	em := &emitter{cfg: cfg, stdout: stdout, e: e}
	if c := cfg.CloudWatch; c.Namespace != "" {
		region := c.Region
		if region == "" {
			region = "us-east-1"
		}
		awsCfg, err := awsconfig.LoadDefaultConfig(ctx, awsconfig.WithRegion(region))
		if err != nil {
			return nil, fmt.Errorf("load aws config: %w", err)
		}
		client := cloudwatch.NewFromConfig(awsCfg, func(o *cloudwatch.Options) {
			if c.Endpoint != "" {
				o.BaseEndpoint = aws.String(c.Endpoint)
			}
		})
		em.cw = &outputs.CloudWatch{Client: client, Namespace: c.Namespace}
	}
	if cfg.Webhook.URL != "" {
		em.webhook = &outputs.Webhook{URL: cfg.Webhook.URL, Retries: cfg.Webhook.Retries, Backoff: cfg.Webhook.Backoff,
			Client: newHTTPClient(cfg.Webhook.Timeout), Log: e.log}
	}
	return em, nil
}

// emit prints changed (new or updated) findings, posts them to the webhook, counts them
// in the metrics (EMF file, CloudWatch), and rewrites the ASFF file from all current
// findings. A webhook that
// stays down is logged, not fatal: the findings are on stdout and in the ASFF file.
func (em *emitter) emit(ctx context.Context, changed, all []detector.Finding) error {
	if err := outputs.WriteJSONLines(em.stdout, changed); err != nil {
		return err
	}
	if em.webhook != nil {
		for _, f := range changed {
			if f.Suppressed {
				continue
			}
			if err := em.webhook.Send(ctx, f); err != nil {
				em.e.log.Error().Str("event", "webhook_gave_up").Str("finding_id", f.ID).Err(err).Msg("finding not delivered to the webhook")
			}
		}
	}
	now := time.Now()
	if em.cfg.ASFFFile != "" {
		if err := outputs.WriteASFFFile(em.cfg.ASFFFile, all, em.cfg.ASFFProductARN, now); err != nil {
			return err
		}
	}
	if em.cfg.MetricsFile != "" && len(changed) > 0 {
		f, err := os.OpenFile(em.cfg.MetricsFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return fmt.Errorf("open metrics file: %w", err)
		}
		defer f.Close()
		if err := outputs.WriteMetrics(f, changed, now); err != nil {
			return err
		}
	}
	if em.cw != nil && len(changed) > 0 {
		if err := em.cw.Put(ctx, changed, now); err != nil {
			em.e.log.Error().Str("event", "cloudwatch_failed").Err(err).Msg("finding metrics not put")
		}
	}
	return nil
}
