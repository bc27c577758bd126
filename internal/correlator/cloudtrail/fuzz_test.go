package cloudtrail

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"io"
	"os"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
)

// result is everything a Read hands out.
type result struct {
	Records  []Record
	Pos      []Pos
	Problems []string
	Stats    Stats
}

func readAll(read func(string, io.Reader, func(*Record, Pos), func(Problem)) Stats, r io.Reader) result {
	var res result
	res.Stats = read("f", r, func(rec *Record, p Pos) {
		res.Records = append(res.Records, *rec)
		res.Pos = append(res.Pos, p)
	}, func(p Problem) {
		res.Problems = append(res.Problems, p.Pos.String()+" truncated="+boolText(p.Truncated)+": "+p.Err.Error())
	})
	return res
}

func boolText(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// agree checks that the fast reader gives what the encoding/json reader gives: the
// same records at the same positions, the same problems worded the same way.
func agree(t *testing.T, data []byte) {
	t.Helper()
	want := readAll(readReference, bytes.NewReader(data))
	got := readAll(Read, bytes.NewReader(data))
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("input %q\nfast:          %+v\nencoding/json: %+v", data, got, want)
	}
	// Byte by byte from the reader, the buffer boundaries fall everywhere; the last
	// bytes come with io.EOF.
	readers := map[string]io.Reader{"in halves": iotest.HalfReader(bytes.NewReader(data))}
	if len(data) < 4096 {
		readers["a byte at a time"] = iotest.DataErrReader(iotest.OneByteReader(bytes.NewReader(data)))
	}
	for how, r := range readers {
		got = readAll(Read, r)
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("input %q read %s\nfast:          %+v\nencoding/json: %+v", data, how, got, want)
		}
	}
}

// TestValuesLargerThanTheBuffer reads records larger than the stream's buffer.
func TestValuesLargerThanTheBuffer(t *testing.T) {
	big := `{"eventTime":"2026-11-20T10:00:00Z","requestParameters":{"a":[` + strings.Repeat(`"0123456789",`, 70000) + `1]},"eventName":"Big"}`
	agree(t, []byte(`{"Records":[`+rec1+`,`+big+`,`+rec2+`]}`))
	agree(t, []byte(big+"\n"+rec1))
	agree(t, []byte("{\n"+big[1:]+"\n{\n"+rec2[1:]))
	agree(t, []byte(`{"Records":[`+rec1+`,`+big[:len(big)-1000]))
	recs, _, st := read(t, []byte(`[`+big+`]`))
	if st.Records != 1 || len(recs[0].RequestParameters) != 70000*13+9 || recs[0].EventName != "Big" {
		t.Fatalf("stats %+v", st)
	}
}

func seeds(tb testing.TB) [][]byte {
	doc := `{"Records":[` + rec1 + `,` + rec2 + `]}`
	out := [][]byte{
		[]byte(doc),
		[]byte("[" + rec1 + "," + rec2 + "]"),
		[]byte(rec1 + "\n\n" + rec2 + "\n"),
		[]byte("{\n" + rec1[1:] + "\n{\n" + rec2[1:]),
		[]byte(`{"version":"0","detail":` + rec1 + "}\n" + `{"version":"0","detail":null,"DETAIL":` + rec2 + "}"),
		[]byte(`{"Records":[` + rec1 + `,5,{"eventTime":"yesterday"},{"userIdentity":"nobody","eventTime":"2026-11-20T10:00:00Z"},{},` + rec2 + `]}`),
		[]byte(`{"Records":{"a":1},"Records":[` + rec1 + `],"x":[1,-2.5e3,true,false,null,"\u00e9\ud83d\ude00"]}`),
		[]byte(`[{"EVENTTIME":"2026-11-20T10:00:00Z","userIdentity":{"\u0061ccessKeyId":"A\"K","ACCESSKEYID":"B\u212a"},"requestParameters":null}]`),
		[]byte(`{"@timestamp":"2026-11-20T10:00:00Z","eventName":"\xff\xfe","userIdentity":{"sessionContext":{"sessionIssuer":{"userName":"r"},"ec2RoleDelivery":"2.0"}}}` + "\n{\"a\":01}\n5x\n"),
		[]byte(doc[:len(doc)-30]),
		[]byte(`{"Records":[` + rec1 + `,{"eventTime": ]}`),
	}
	if f, err := os.Open("../../../testdata/cloudtrail/invictus-ir-aws_dataset/excerpt.json.gz"); err == nil {
		defer f.Close()
		if gz, err := gzip.NewReader(f); err == nil {
			if b, err := io.ReadAll(io.LimitReader(gz, 16<<10)); err == nil {
				out = append(out, b)
			}
		}
	}
	return out
}

// TestFastDecoderAgrees runs the seeds of the fuzz test, so that `go test` checks them.
func TestFastDecoderAgrees(t *testing.T) {
	for _, s := range seeds(t) {
		agree(t, s)
	}
}

// FuzzFastDecoder holds the fast reader against the encoding/json one on any input:
// go test -run '^$' -fuzz FuzzFastDecoder -fuzztime 1m ./internal/correlator/cloudtrail
func FuzzFastDecoder(f *testing.F) {
	for _, s := range seeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		agree(t, data)
	})
}

// TestPlainWord holds the 8-bytes-at-once test against the table, for every byte value
// at every place in the word.
func TestPlainWord(t *testing.T) {
	for place := range 8 {
		for c := range 256 {
			w := []byte("abcdefgh")
			w[place] = byte(c)
			if got, want := plainWord(binary.LittleEndian.Uint64(w)), !strEnd[c]; got != want {
				t.Fatalf("byte %#x at %d: plain %v, want %v", c, place, got, want)
			}
		}
	}
}
