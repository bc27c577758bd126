package outputs

import (
	"compress/gzip"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/cloudwatch"
	"github.com/aws/smithy-go/encoding/cbor"
)

// TestCloudWatchPutMetricData decodes the SDK's real PutMetricData request (Smithy RPC
// v2 CBOR) at a local endpoint.
func TestCloudWatchPutMetricData(t *testing.T) {
	var mu sync.Mutex
	var got cbor.Map
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var rd io.Reader = r.Body
		if r.Header.Get("Content-Encoding") == "gzip" { // the SDK compresses PutMetricData
			zr, err := gzip.NewReader(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			rd = zr
		}
		body, _ := io.ReadAll(rd)
		if !strings.HasSuffix(r.URL.Path, "/operation/PutMetricData") || !strings.HasPrefix(r.Header.Get("Authorization"), "AWS4-HMAC-SHA256") {
			http.Error(w, "unexpected request "+r.URL.Path, http.StatusBadRequest)
			return
		}
		v, err := cbor.Decode(body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		mu.Lock()
		got, _ = v.(cbor.Map)
		mu.Unlock()
		w.Header().Set("Smithy-Protocol", "rpc-v2-cbor")
		w.Header().Set("Content-Type", "application/cbor")
		w.Write(cbor.Encode(cbor.Map{}))
	}))
	defer srv.Close()
	client := cloudwatch.New(cloudwatch.Options{Region: "us-east-1", BaseEndpoint: aws.String(srv.URL),
		Credentials: credentials.NewStaticCredentialsProvider("AKIDTEST", "secret", "")})
	cw := &CloudWatch{Client: client, Namespace: "imdsguard"}
	if err := cw.Put(context.Background(), CountFindings(sample()), time.Now()); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if ns, _ := got["Namespace"].(cbor.String); ns != "imdsguard" {
		t.Fatalf("namespace %v", got["Namespace"])
	}
	data, _ := got["MetricData"].(cbor.List)
	if len(data) != 4 {
		t.Fatalf("%d data: %v", len(data), got)
	}
	d0 := data[0].(cbor.Map)
	if d0["MetricName"].(cbor.String) != "Findings" {
		t.Fatalf("%v", d0)
	}
	if v, err := cbor.AsFloat64(d0["Value"]); err != nil || v != 1 {
		t.Fatalf("value %v %v", d0["Value"], err)
	}
}
