package metricstest

import (
	"fmt"
	"io"
	"net/http"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Scrape fetches url and parses the text exposition format.
func Scrape(client *http.Client, url string) (map[string]*dto.MetricFamily, error) {
	resp, err := client.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return nil, fmt.Errorf("scrape: %s: %s", resp.Status, b)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	return p.TextToMetricFamilies(resp.Body)
}

// Counter returns the value of family's counter with the given label pair ("" for none).
func Counter(fams map[string]*dto.MetricFamily, family, label, value string) (float64, bool) {
	f, ok := fams[family]
	if !ok {
		return 0, false
	}
	for _, m := range f.GetMetric() {
		if label == "" && len(m.GetLabel()) == 0 {
			return m.GetCounter().GetValue(), true
		}
		for _, l := range m.GetLabel() {
			if l.GetName() == label && l.GetValue() == value {
				return m.GetCounter().GetValue(), true
			}
		}
	}
	return 0, false
}

// Gauge returns the value of an unlabelled gauge family.
func Gauge(fams map[string]*dto.MetricFamily, family string) (float64, bool) {
	f, ok := fams[family]
	if !ok || len(f.GetMetric()) != 1 || f.GetMetric()[0].GetGauge() == nil {
		return 0, false
	}
	return f.GetMetric()[0].GetGauge().GetValue(), true
}
