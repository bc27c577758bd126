package cloudtrail

import (
	"bytes"
	"compress/gzip"
	"strings"
	"testing"
)

const rec1 = `{"eventVersion":"1.09","userIdentity":{"type":"AssumedRole","principalId":"AROAEXAMPLE:i-0123456789abcdef0","arn":"arn:aws:sts::111111111111:assumed-role/web/i-0123456789abcdef0","accountId":"111111111111","accessKeyId":"ASIAEXAMPLE1","sessionContext":{"sessionIssuer":{"type":"Role","arn":"arn:aws:iam::111111111111:role/web","accountId":"111111111111","userName":"web"},"attributes":{"creationDate":"2026-11-20T09:00:00Z","mfaAuthenticated":"false"},"ec2RoleDelivery":"1.0"}},"eventTime":"2026-11-20T10:00:00Z","eventSource":"s3.amazonaws.com","eventName":"ListBuckets","awsRegion":"us-east-1","sourceIPAddress":"198.51.100.9","userAgent":"aws-cli/2","requestParameters":null,"responseElements":null,"eventID":"e1","recipientAccountId":"111111111111"}`
const rec2 = `{"eventVersion":"1.09","userIdentity":{"type":"AWSService","invokedBy":"ec2.amazonaws.com"},"eventTime":"2026-11-20T09:00:00Z","eventSource":"sts.amazonaws.com","eventName":"AssumeRole","sourceIPAddress":"ec2.amazonaws.com","requestParameters":{"roleArn":"arn:aws:iam::111111111111:role/web","roleSessionName":"i-0123456789abcdef0"},"responseElements":{"credentials":{"accessKeyId":"ASIAEXAMPLE1","sessionToken":"x","expiration":"Nov 20, 2026, 3:00:00 PM"}},"eventID":"e2"}`

func read(t *testing.T, data []byte) ([]Record, []Problem, Stats) {
	t.Helper()
	var recs []Record
	var probs []Problem
	st := Read("f", bytes.NewReader(data), func(r *Record, _ Pos) { recs = append(recs, *r) }, func(p Problem) { probs = append(probs, p) })
	return recs, probs, st
}

func gz(s string) []byte {
	var b bytes.Buffer
	w := gzip.NewWriter(&b)
	w.Write([]byte(s))
	w.Close()
	return b.Bytes()
}

func TestFormats(t *testing.T) {
	doc := `{"Records":[` + rec1 + `,` + rec2 + `]}`
	cases := map[string][]byte{
		"gzip document":   gz(doc),
		"plain document":  []byte(doc),
		"pretty document": []byte("\n{\n  \"Records\" : [\n" + rec1 + ",\n" + rec2 + "\n]\n}\n"),
		"array":           []byte("[" + rec1 + "," + rec2 + "]"),
		"json lines":      []byte(rec1 + "\n\n" + rec2 + "\n"),
		"eventbridge":     []byte(`{"version":"0","detail-type":"AWS API Call via CloudTrail","source":"aws.s3","detail":` + rec1 + "}\n" + `{"version":"0","detail":` + rec2 + "}"),
		"gzip json lines": gz(rec1 + "\n" + rec2),
		"pretty values":   []byte("{\n" + rec1[1:] + "\n{\n" + rec2[1:]),
		"extra doc keys":  []byte(`{"Records":[` + rec1 + `,` + rec2 + `],"extra":{"a":[1,2]}}`),
	}
	for name, data := range cases {
		t.Run(name, func(t *testing.T) {
			recs, probs, st := read(t, data)
			if len(probs) != 0 || st.Records != 2 || st.Malformed != 0 || st.Truncated {
				t.Fatalf("probs %v stats %+v", probs, st)
			}
			if recs[0].UserIdentity.AccessKeyID != "ASIAEXAMPLE1" || recs[0].UserIdentity.SessionContext.EC2RoleDelivery != "1.0" || recs[0].Time.Hour() != 10 {
				t.Fatalf("rec1 = %+v", recs[0])
			}
			if recs[0].UserIdentity.SessionName() != "i-0123456789abcdef0" || recs[0].UserIdentity.RoleName() != "web" {
				t.Fatalf("session %q role %q", recs[0].UserIdentity.SessionName(), recs[0].UserIdentity.RoleName())
			}
			a, ok := ParseAssumeRole(&recs[1])
			if !ok || a.AccessKeyID != "ASIAEXAMPLE1" || a.RoleSessionName != "i-0123456789abcdef0" || a.Expiration.Hour() != 15 {
				t.Fatalf("assume role = %+v %v", a, ok)
			}
		})
	}
}

func TestMalformedRecordsAreSkippedWithPosition(t *testing.T) {
	doc := `{"Records":[` + rec1 + `,5,{"eventTime":"yesterday"},{"userIdentity":"nobody","eventTime":"2026-11-20T10:00:00Z"},{},` + rec2 + `]}`
	recs, probs, st := read(t, gz(doc))
	if len(recs) != 2 || st.Malformed != 4 || st.Truncated {
		t.Fatalf("recs %d stats %+v probs %v", len(recs), st, probs)
	}
	if probs[0].Index != 1 || probs[0].File != "f" || probs[3].Index != 4 {
		t.Fatalf("positions: %+v", probs)
	}
	lines := rec1 + "\n{not json\n" + `{"eventTime":"2026-11-20T10:00:00Z","userIdentity":[]}` + "\n" + rec2 + "\n"
	recs, probs, st = read(t, []byte(lines))
	if len(recs) != 2 || st.Malformed != 2 || probs[0].Index != 2 || probs[1].Index != 3 || st.Truncated {
		t.Fatalf("lines: recs %d stats %+v probs %+v", len(recs), st, probs)
	}
}

func TestTruncatedFilesAreReported(t *testing.T) {
	doc := `{"Records":[` + rec1 + `,` + rec2 + `,` + rec1 + `]}`
	full := gz(doc)
	cases := map[string][]byte{
		"gzip cut":        full[:len(full)-20],
		"json cut":        []byte(doc[:len(doc)-len(rec1)/2]),
		"json lines cut":  []byte(rec1 + "\n" + rec2 + "\n" + rec1[:40]),
		"json broken mid": []byte(`{"Records":[` + rec1 + `,` + rec2 + `,{"eventTime": ]}`),
	}
	for name, data := range cases {
		t.Run(name, func(t *testing.T) {
			recs, probs, st := read(t, data)
			if !st.Truncated || len(recs) < 1 || len(probs) == 0 || !probs[len(probs)-1].Truncated {
				t.Fatalf("recs %d stats %+v probs %+v", len(recs), st, probs)
			}
		})
	}
}

func TestEmptyAndGarbage(t *testing.T) {
	if _, probs, st := read(t, nil); len(probs) != 0 || st.Records != 0 {
		t.Fatal("empty file")
	}
	_, probs, st := read(t, []byte("hello\nworld\n"))
	if st.Malformed != 2 || len(probs) != 2 {
		t.Fatalf("garbage: %+v", st)
	}
	if !strings.Contains(probs[0].Pos.String(), "f: record 1") {
		t.Fatal(probs[0].Pos.String())
	}
}

func TestIsInstanceID(t *testing.T) {
	for s, want := range map[string]bool{"i-0123456789abcdef0": true, "i-12345678": true, "i-xyz": false, "my-function": false, "i-0123456789ABCDEF0": false} {
		if IsInstanceID(s) != want {
			t.Errorf("%s", s)
		}
	}
}
