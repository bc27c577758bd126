// Package correlator is imdsguard-correlator's wiring: its commands (detect,
// investigate, serve, check-config, update-ip-ranges) put together the CloudTrail reader,
// the detector, the fingerprint intake and the finding outputs. cmd/imdsguard-correlator
// only calls Run.
package correlator

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/atomicfile"
	"github.com/imdsguard/imdsguard/internal/cli"
	"github.com/imdsguard/imdsguard/internal/correlator/cloudtrail"
	"github.com/imdsguard/imdsguard/internal/correlator/config"
	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/correlator/fpstore"
	"github.com/imdsguard/imdsguard/internal/correlator/inventory"
	"github.com/imdsguard/imdsguard/internal/correlator/ipranges"
	"github.com/imdsguard/imdsguard/internal/correlator/trailwatch"
	"github.com/imdsguard/imdsguard/internal/logging"
	buildversion "github.com/imdsguard/imdsguard/internal/version"
)

// version is the build's version, as Run was given it.
var version = ""

const usage = `imdsguard-correlator flags off-host use of instance credentials in CloudTrail.

Usage:
  imdsguard-correlator detect [--config FILE] [--fingerprints FILE] [--inventory FILE]...
        CLOUDTRAIL_FILE...
        run detection over files (gzip or plain JSON, JSON lines; a directory is read
        recursively; "-" is stdin) and print findings as JSON lines; --inventory takes
        the JSON of aws ec2 describe-network-interfaces, describe-addresses,
        describe-vpc-endpoints or aws lambda list-functions (repeatable)
  imdsguard-correlator investigate [--config FILE] [--fingerprints FILE] [--inventory FILE]...
        --access-key KEY [--format text|json] CLOUDTRAIL_FILE...
        print one key's story: issuance, sources, API calls, findings
  imdsguard-correlator serve --config FILE [--fingerprints FILE]
        follow serve.directory and/or serve.s3 and print findings as they appear;
        with intake.listen, also accept fingerprints from agents (POST /v1/fingerprints)
  imdsguard-correlator update-ip-ranges --config FILE NEW_IP_RANGES_JSON
        check a new ip-ranges.json and install it at ip_ranges (serve picks it up)
  imdsguard-correlator check-config FILE
  imdsguard-correlator version
`

// Run runs one correlator command line (args without the program name) and returns the
// process exit code: 0 done, 1 failed, 2 wrong usage. buildVersion is what the Makefile
// stamped into the binary ("" for a plain go build).
func Run(ctx context.Context, buildVersion string, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if buildVersion != "" {
		version = buildVersion
	}
	return cli.Program{Name: "imdsguard-correlator", Usage: usage, Version: version, Commands: map[string]func([]string) error{
		"detect":           func(a []string) error { return cmdDetect(ctx, a, stdin, stdout, stderr) },
		"investigate":      func(a []string) error { return cmdInvestigate(ctx, a, stdin, stdout, stderr) },
		"serve":            func(a []string) error { return cmdServe(ctx, a, stdout, stderr) },
		"update-ip-ranges": func(a []string) error { return cmdUpdateIPRanges(a, stdout) },
		"check-config":     func(a []string) error { return cmdCheckConfig(a, stdout) },
	}}.Run(args, stdout, stderr)
}

func versionString() string { return buildversion.String(version) }

func cmdCheckConfig(args []string, stdout io.Writer) error {
	if len(args) != 1 {
		return fmt.Errorf("%w: check-config takes exactly one file", cli.ErrUsage)
	}
	cfg, err := config.Load(args[0])
	if err != nil {
		return err
	}
	if cfg.IPRanges != "" {
		if _, err := ipranges.Load(cfg.IPRanges); err != nil {
			return fmt.Errorf("ip_ranges: %w", err)
		}
	}
	if err := checkIntake(cfg.Intake); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s: ok\n---\n%s", args[0], cfg)
	return nil
}

func cmdUpdateIPRanges(args []string, stdout io.Writer) error {
	fl := flag.NewFlagSet("update-ip-ranges", flag.ContinueOnError)
	fl.SetOutput(io.Discard)
	cfgPath := fl.String("config", "", "config file")
	if err := fl.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", cli.ErrUsage, err)
	}
	if *cfgPath == "" || fl.NArg() != 1 {
		return fmt.Errorf("%w: update-ip-ranges needs --config and one new file", cli.ErrUsage)
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return err
	}
	if cfg.IPRanges == "" {
		return fmt.Errorf("%s: ip_ranges is not set", *cfgPath)
	}
	data, err := os.ReadFile(fl.Arg(0))
	if err != nil {
		return fmt.Errorf("read new ip ranges: %w", err)
	}
	set, err := ipranges.Parse(bytes.NewReader(data))
	if err != nil {
		return fmt.Errorf("%s: %w", fl.Arg(0), err)
	}
	if err := atomicfile.Write(cfg.IPRanges, data, 0o644); err != nil {
		return fmt.Errorf("install ip ranges: %w", err)
	}
	fmt.Fprintf(stdout, "%s: %d prefixes, syncToken %s, createDate %s\n", cfg.IPRanges, set.Len(), set.SyncToken, set.CreateDate)
	return nil
}

// env is what every command loads: the configuration, AWS's ranges, fingerprints, a log.
type env struct {
	cfg    config.Config
	ranges *ipranges.Set
	fps    *fpstore.Memory
	// stored is the intake's store when serve runs one; the detector reads it with fps.
	stored fpstore.Store
	// inv is what inventory.files and --inventory said.
	inv   *inventory.Inventory
	log   zerolog.Logger
	close func()
}

func load(cfgPath, fpPath string, stderr io.Writer) (*env, error) {
	cfg := config.Default()
	var err error
	if cfgPath != "" {
		if cfg, err = config.Load(cfgPath); err != nil {
			return nil, err
		}
	}
	log, closeLog, err := newLogger(cfg.Log, stderr)
	if err != nil {
		return nil, err
	}
	e := &env{cfg: cfg, fps: fpstore.NewMemory(), inv: &inventory.Inventory{}, log: log, close: closeLog}
	if cfg.IPRanges != "" {
		if e.ranges, err = ipranges.Load(cfg.IPRanges); err != nil {
			closeLog()
			return nil, fmt.Errorf("ip_ranges: %w", err)
		}
	} else {
		log.Warn().Str("event", "no_ip_ranges").Msg("ip_ranges is not set: every address that is not an instance's own is judged outside AWS")
	}
	for _, p := range []string{cfg.Fingerprints, fpPath} {
		if p == "" {
			continue
		}
		if err := e.fps.LoadFile(p); err != nil {
			closeLog()
			return nil, err
		}
	}
	if err := e.addInventory(cfg.Inventory.Files); err != nil {
		closeLog()
		return nil, err
	}
	return e, nil
}

// addInventory loads inventory files (inventory.files, --inventory).
func (e *env) addInventory(paths []string) error {
	if len(paths) == 0 {
		return nil
	}
	inv, err := inventory.Load(paths...)
	if err != nil {
		return err
	}
	e.inv.Merge(inv)
	e.log.Info().Str("event", "inventory_loaded").Strs("files", paths).Int("addresses", len(inv.Addresses)).Int("vpc_endpoints", len(inv.Endpoints)).
		Int("functions", len(inv.Functions)).Msg("inventory loaded")
	return nil
}

// fileList is a repeatable flag.
type fileList []string

func (l *fileList) String() string     { return strings.Join(*l, ",") }
func (l *fileList) Set(v string) error { *l = append(*l, v); return nil }

func (e *env) detector(onlyKey string) *detector.Detector {
	var fps fpstore.Store = e.fps
	if e.stored != nil {
		fps = fpstore.Union{e.fps, e.stored}
	}
	opt := detector.OptionsFrom(e.cfg, e.ranges, fps, e.log)
	opt.OnlyKey = onlyKey
	d := detector.New(opt)
	d.AddInventory(e.inv)
	return d
}

func newLogger(c config.Log, stderr io.Writer) (zerolog.Logger, func(), error) {
	return logging.New(c.Output, c.Level, stderr)
}

// maxProblemLogs bounds the skipped-record lines logged per file; the rest are counted.
const maxProblemLogs = 20

// readInputs feeds every record of the named inputs to observe, and tells prog (which
// may be nil) how far it is. "-" is stdin; a
// directory is read recursively. Bad records and truncated files are logged and counted;
// a file that cannot be opened, or from which not one record could be read, is an error
// (after the others were read): a run that read nothing from it must not look like one
// that found nothing in it.
func readInputs(ctx context.Context, names []string, stdin io.Reader, log zerolog.Logger, prog *progress, observe func(*cloudtrail.Record)) (cloudtrail.Stats, int, error) {
	var total cloudtrail.Stats
	truncated := 0
	var errs []error
	readOne := func(name string, r io.Reader) {
		logged := 0
		var firstProblem *cloudtrail.Problem
		defer prog.fileDone()
		st := cloudtrail.Read(name, prog.reader(r), func(rec *cloudtrail.Record, _ cloudtrail.Pos) { prog.record(); observe(rec) }, func(p cloudtrail.Problem) {
			if firstProblem == nil {
				firstProblem = &p
			}
			if p.Truncated {
				log.Warn().Str("event", "file_truncated").Str("file", p.File).Int64("index", p.Index).Int64("offset", p.Offset).Err(p.Err).Msg("log file ends early; records after this point are lost")
				return
			}
			if logged++; logged <= maxProblemLogs {
				log.Warn().Str("event", "record_skipped").Str("file", p.File).Int64("index", p.Index).Int64("offset", p.Offset).Err(p.Err).Msg("malformed record skipped")
			}
		})
		if st.Truncated {
			truncated++
		}
		if st.Records == 0 && firstProblem != nil {
			errs = append(errs, fmt.Errorf("%s: no record could be read (%d skipped): %s: %w", name, st.Malformed, firstProblem.Pos, firstProblem.Err))
		}
		if st.Malformed > maxProblemLogs {
			log.Warn().Str("event", "records_skipped").Str("file", name).Int64("malformed", st.Malformed).Msg("more malformed records skipped than logged")
		}
		total.Add(st)
	}
	if len(names) == 0 {
		names = []string{"-"}
	}
	for _, name := range names {
		if ctx.Err() != nil {
			return total, truncated, ctx.Err()
		}
		if name == "-" {
			readOne("(stdin)", stdin)
			continue
		}
		info, err := os.Stat(name)
		if err != nil {
			errs = append(errs, fmt.Errorf("open input: %w", err))
			continue
		}
		if !info.IsDir() {
			if err := readFile(name, readOne); err != nil {
				errs = append(errs, err)
			}
			continue
		}
		err = filepath.WalkDir(name, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				errs = append(errs, fmt.Errorf("walk %s: %w", p, err))
				return nil
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if d.Type().IsRegular() && !trailwatch.Skip(p) {
				if err := readFile(p, readOne); err != nil {
					errs = append(errs, err)
				}
			}
			return nil
		})
		if err != nil {
			return total, truncated, err
		}
	}
	return total, truncated, errors.Join(errs...)
}

func readFile(path string, readOne func(string, io.Reader)) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open input: %w", err)
	}
	defer f.Close()
	readOne(path, f)
	return nil
}
