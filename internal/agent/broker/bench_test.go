package broker

import (
	"io"
	"net/http"
	"testing"
)

// BenchmarkBroker compares keep-alive GETs straight to a local IMDS stand-in with the
// same GETs through the broker, in one run: the broker's own cost without the kernel,
// printed in µs per request.
func BenchmarkBroker(b *testing.B) {
	tb := start(b, true, v4Redirect(false))
	direct := "http://" + tb.imdsAddr + "/latest/meta-data/instance-id"
	via := tb.url + "/latest/meta-data/instance-id"
	for _, c := range []struct{ name, url string }{{"direct", direct}, {"broker", via}} {
		b.Run(c.name, func(b *testing.B) {
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
			for i := 0; i < b.N; i++ {
				resp, err := client.Get(c.url)
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/1e3/float64(b.N), "µs/req")
		})
	}
}
