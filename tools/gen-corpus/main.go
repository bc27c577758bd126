// Command gen-corpus writes the labelled CloudTrail corpus the detector tests use, as
// files an operator can run the correlator on:
//
//	go run ./tools/gen-corpus -out DIR [-seed N]
//	imdsguard-correlator detect --config DIR/config.yaml DIR/cloudtrail
//
// DIR gets config.yaml, ip-ranges.json, fingerprints.jsonl (referenced from the
// config), labels.jsonl (what each record must yield) and cloudtrail/: the records
// shuffled over gzip log files as AWS delivers them, a plain JSON file and a JSON-lines
// file, with a few malformed records.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/imdsguard/imdsguard/internal/testing/ctcorpus"
)

func main() {
	out := flag.String("out", "", "output directory (created)")
	seed := flag.Int64("seed", 1, "shuffle seed")
	flag.Parse()
	if *out == "" {
		fmt.Fprintln(os.Stderr, "usage: gen-corpus -out DIR [-seed N]")
		os.Exit(2)
	}
	if err := ctcorpus.WriteDir(*out, *seed, os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "gen-corpus: %v\n", err)
		os.Exit(1)
	}
}
