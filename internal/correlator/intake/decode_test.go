package intake

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/wire"
)

// decodeReference is the intake's decoder as it was before decodeBatch (encoding/json,
// strict, the batch first with its fingerprints as json.RawMessage, then each of them):
// the fuzz test holds decodeBatch against it.
func decodeReference(data []byte) (wire.Batch, [][]byte, error) {
	var rb struct {
		wire.Batch
		Fingerprints []json.RawMessage `json:"fingerprints"` // shadows Batch.Fingerprints
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	err := dec.Decode(&rb)
	if err == nil {
		if _, err = dec.Token(); errors.Is(err, io.EOF) {
			err = nil
		} else if err == nil {
			err = errors.New("data after the batch")
		}
	}
	if err != nil {
		return wire.Batch{}, nil, err
	}
	b := rb.Batch
	b.Fingerprints = make([]wire.Fingerprint, len(rb.Fingerprints))
	raws := make([][]byte, len(rb.Fingerprints))
	for i, raw := range rb.Fingerprints {
		fd := json.NewDecoder(bytes.NewReader(raw))
		fd.DisallowUnknownFields()
		if err := fd.Decode(&b.Fingerprints[i]); err != nil {
			return wire.Batch{}, nil, fmt.Errorf("fingerprints[%d]: %w", i, err)
		}
		raws[i] = raw
	}
	return b, raws, nil
}

// agree fails unless decodeBatch and decodeReference both refuse data, or both
// accept it with the same batch and the same bytes for each fingerprint.
func agree(t *testing.T, data []byte) {
	t.Helper()
	want, wantRaws, wantErr := decodeReference(data)
	got, gotRaws, gotErr := decodeBatch(data)
	if (wantErr == nil) != (gotErr == nil) {
		t.Fatalf("%q:\nencoding/json: %v\ndecodeBatch:   %v", data, wantErr, gotErr)
	}
	if wantErr != nil {
		return
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%q:\nencoding/json: %#v\ndecodeBatch:   %#v", data, want, got)
	}
	if !reflect.DeepEqual(gotRaws, wantRaws) {
		t.Fatalf("%q: bytes kept:\nencoding/json: %q\ndecodeBatch:   %q", data, wantRaws, gotRaws)
	}
}

// decodeSeeds are batches as the agent sends them and the odd corners of
// encoding/json.
func decodeSeeds(tb testing.TB) []string {
	now := time.Date(2026, 11, 30, 4, 0, 0, 0, time.UTC)
	fp := wire.Fingerprint{
		ID: "0123456789abcdef0123456789abcdef", AccessKeyID: "ASIAEXAMPLE000000001", Role: "web",
		InstanceProfileARN: "arn:aws:iam::123456789012:instance-profile/web", LastUpdated: now, Expiration: now.Add(6 * time.Hour),
		Instance:      wire.Instance{ID: "i-0abc", AccountID: "123456789012", Region: "us-east-1", AvailabilityZone: "us-east-1a"},
		HostAddresses: []netip.Addr{netip.MustParseAddr("10.0.0.5"), netip.MustParseAddr("fe80::1%eth0")},
		Process: wire.Process{PID: 4242, Exe: "/usr/bin/python3", User: "app", Unit: "app.service", ContainerID: "abc", ContainerRuntime: "containerd",
			Pod: &wire.Pod{Namespace: "ns", Name: "p", UID: "u", Container: "c", ServiceAccount: "sa"}, ECSTask: &wire.ECSTask{ARN: "arn", Family: "f", Container: "c"}},
		IMDSVersion: "v2", TokenHMAC: strings.Repeat("ab", 32),
	}
	body, err := json.Marshal(wire.Batch{Document: "{\n\t\"accountId\": \"123456789012\"\n}", PKCS7: "MIAG\nCSqG", BatchID: "7", Fingerprints: []wire.Fingerprint{fp, fp}})
	if err != nil {
		tb.Fatal(err)
	}
	one, _ := json.Marshal(fp)
	pretty, _ := json.MarshalIndent(wire.Batch{BatchID: "x", Fingerprints: []wire.Fingerprint{fp}}, "", "  ")
	f := string(one)
	return []string{
		string(body), string(pretty), string(body) + " \n\t", " " + string(body),
		`{"fingerprints":[` + f + `]}`,
		`{"fingerprints":[` + f + `],"fingerprints":[{"id":"x"}]}`,
		`{"fingerprints":[` + f + `],"fingerprints":null}`,
		`{"fingerprints":[` + f + `],"fingerprints":[]}`,
		`{"fingerprints":[null,` + f + `]}`,
		`{"Fingerprints":[{"ID":"a","Access_Key_Id":"b","ROLE":"r"}],"DOCUMENT":"d","Pkcs7":"p","batch_ID":"b"}`,
		`{"fingerprints":[{"id":"a","\u212aey":1}]}`, `{"fingerprints":[{"ſtuff":1}]}`, `{"batch_id":"a","batch_id":null}`,
		`{"fingerprints":[{"role":"ſ","imds_verſion":"v2"}]}`,
		`{"fingerprints":[{"host_addresses":["1.2.3.4","::1"],"host_addresses":[null,"5.6.7.8",null]}]}`,
		`{"fingerprints":[{"host_addresses":["1.2.3.4"],"host_addresses":[]}]}`,
		`{"fingerprints":[{"host_addresses":null}]}`, `{"fingerprints":[{"host_addresses":[""]}]}`,
		`{"fingerprints":[{"host_addresses":["1.2.3.4"],"host_addresses":["5.6.7.8","9.9.9.9"],"host_addresses":[null,null,null]}]}`,
		`{"fingerprints":[{"host_addresses":["not an address"]}]}`, `{"fingerprints":[{"host_addresses":[1]}]}`,
		`{"fingerprints":[{"host_addresses":"1.2.3.4"}]}`, `{"fingerprints":[{"host_addresses":{}}]}`,
		`{"fingerprints":[{"process":{"pid":1e2}}]}`, `{"fingerprints":[{"process":{"pid":-0}}]}`, `{"fingerprints":[{"process":{"pid":1.0}}]}`,
		`{"fingerprints":[{"process":{"pid":99999999999999999999}}]}`, `{"fingerprints":[{"process":{"pid":"5"}}]}`,
		`{"fingerprints":[{"process":{"pid":01}}]}`, `{"fingerprints":[{"process":{"pid":-}}]}`, `{"fingerprints":[{"process":{"pid":null,"pid":7}}]}`,
		`{"fingerprints":[{"process":{"pod":{"name":"a"},"pod":{"uid":"b"}}}]}`, `{"fingerprints":[{"process":{"pod":{"name":"a"},"pod":null}}]}`,
		`{"fingerprints":[{"process":{"ecs_task":{"arn":"a"},"ecs_task":{"family":"b"}}}]}`, `{"fingerprints":[{"process":{"pod":[]}}]}`,
		`{"fingerprints":[{"process":null,"instance":null}]}`, `{"fingerprints":[{"instance":{"id":"a"},"instance":{"region":"b"}}]}`,
		`{"fingerprints":[{"instance":"x"}]}`, `{"fingerprints":[{"instance":{"zone":"x"}}]}`,
		`{"fingerprints":[{"last_updated":"2026-11-30T04:00:00Z","expiration":"2026-11-30T10:00:00+02:00"}]}`,
		`{"fingerprints":[{"last_updated":"2026-11-30T04:00:00Z","last_updated":null}]}`, `{"fingerprints":[{"expiration":"2026-11-30"}]}`,
		`{"fingerprints":[{"expiration":1}]}`, `{"fingerprints":[{"expiration":{}}]}`, `{"fingerprints":[{"expiration":"2026-11-30T04:00:00\u005a"}]}`,
		`{"fingerprints":[{"id":"\ud83d\ude00 \ud83d \udc00x \u00e9 \" \\ \/ \b \f \n \r \t"}]}`, "{\"fingerprints\":[{\"id\":\"\xff\xfe ok \xc3\"}]}",
		`{"fingerprints":[{"id":"\x"}]}`, "{\"fingerprints\":[{\"id\":\"a\x01\"}]}", `{"fingerprints":[{"id":"\u12"}]}`,
		`{"fingerprints":[{"id":1}]}`, `{"fingerprints":[{"id":true}]}`, `{"fingerprints":[{"id":[]}]}`, `{"fingerprints":[1]}`, `{"fingerprints":["x"]}`,
		`{"fingerprints":[[]]}`, `{"fingerprints":{}}`, `{"fingerprints":"x"}`, `{"unknown":1}`, `{"document":5}`,
		`null`, ` null `, `nul`, `[]`, `"x"`, `1`, `true`, ``, ` `, `{}`, `{} {}`, `{}]`, `{},`, `{"a"}`, `{"document":"a",}`, `{,}`,
		`{"fingerprints":[{}],}`, `{"fingerprints":[{},]}`, `{"fingerprints":[{}] `, "\ufeff{}", `{"document":"a"}x`,
		`{"fingerprints":[{"id":"a"}],"batch_id":"b","fingerprints":[{"id":"c","id":"d"}]}`,
	}
}

func TestDecodeBatchAgreesWithEncodingJSON(t *testing.T) {
	for _, s := range decodeSeeds(t) {
		agree(t, []byte(s))
	}
	// encoding/json's nesting limit, in a fingerprints array that a later one replaces.
	for _, depth := range []int{9997, 9998, 9999} {
		nested := strings.Repeat("[", depth) + strings.Repeat("]", depth)
		agree(t, []byte(`{"fingerprints":[`+nested+`],"fingerprints":[]}`))
	}
}

func FuzzDecodeBatch(f *testing.F) {
	for _, s := range decodeSeeds(f) {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		agree(t, data)
	})
}

// BenchmarkDecode compares the decoders on a batch of 100 as the agent sends it.
func BenchmarkDecode(b *testing.B) {
	var fps []string
	for range 100 {
		fps = append(fps, decodeSeeds(b)[4][len(`{"fingerprints":[`):len(decodeSeeds(b)[4])-2])
	}
	body := []byte(`{"document":"{\n\t\"accountId\": \"123456789012\"\n}","pkcs7":"` + strings.Repeat(`MIAGCSqGSIb3DQEHAqCAMIACAQExDzANBglghkgBZQMEAgEFADCABgkqhkiG9w0BBwGggCSABIIB\n`, 20) +
		`","batch_id":"1","fingerprints":[` + strings.Join(fps, ",") + `]}`)
	for _, c := range []struct {
		name string
		fn   func([]byte) (wire.Batch, [][]byte, error)
	}{{"one-pass", decodeBatch}, {"encoding-json", decodeReference}} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			for b.Loop() {
				if _, _, err := c.fn(body); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// Every field of the wire types, filled by reflection, decodes as encoding/json decodes
// it: a field added to internal/wire and not to the decoder fails here (the decoder
// refuses unknown fields), not at the first agent that sends it.
func TestDecodeBatchKnowsEveryWireField(t *testing.T) {
	var fp wire.Fingerprint
	fill(reflect.ValueOf(&fp).Elem())
	b := wire.Batch{Document: "doc", PKCS7: "sig", BatchID: "b-1", Fingerprints: []wire.Fingerprint{fp}}
	data, err := json.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := decodeBatch(data); err != nil {
		t.Fatalf("decode a batch with every wire field: %v\n%s", err, data)
	}
	agree(t, data)
}

// fill sets every string, integer, time and slice field it can reach to a non-zero
// value, so that omitempty leaves none out.
func fill(v reflect.Value) {
	switch v.Kind() {
	case reflect.String:
		v.SetString("x")
	case reflect.Int, reflect.Int32, reflect.Int64, reflect.Uint32, reflect.Uint64:
		if v.CanInt() {
			v.SetInt(7)
		} else {
			v.SetUint(7)
		}
	case reflect.Pointer:
		v.Set(reflect.New(v.Type().Elem()))
		fill(v.Elem())
	case reflect.Slice:
		v.Set(reflect.MakeSlice(v.Type(), 1, 1))
		fill(v.Index(0))
	case reflect.Struct:
		if v.Type() == reflect.TypeOf(time.Time{}) {
			v.Set(reflect.ValueOf(time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC)))
			return
		}
		for i := 0; i < v.NumField(); i++ {
			if v.Type().Field(i).IsExported() {
				fill(v.Field(i))
			}
		}
	}
}
