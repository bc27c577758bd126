package metricstest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
)

// ValidateEMF checks one line against the Embedded Metric Format specification
// (CloudWatch_Embedded_Metric_Format_Specification): a JSON object with _aws.Timestamp
// (ms) and _aws.CloudWatchMetrics; each directive's Namespace (1-255), Dimensions (sets of
// at most 30 keys that are string members of the root) and Metrics (at most 100, Name
// 1-255, an optional valid Unit) whose names are number members of the root. It returns
// the metric values keyed "Name{Dim=v,...}" (dimensions sorted by name, as Datum.Key)
// for the first dimension set.
func ValidateEMF(line []byte) (map[string]float64, error) {
	var root map[string]any
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.UseNumber()
	if err := dec.Decode(&root); err != nil {
		return nil, fmt.Errorf("not a JSON object: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("data after the JSON object")
	}
	meta, ok := root["_aws"].(map[string]any)
	if !ok {
		return nil, fmt.Errorf("no _aws object")
	}
	ts, ok := meta["Timestamp"].(json.Number)
	if !ok {
		return nil, fmt.Errorf("_aws.Timestamp missing or not a number")
	}
	if ms, err := ts.Int64(); err != nil || ms < 1e12 {
		return nil, fmt.Errorf("_aws.Timestamp %v is not epoch milliseconds", ts)
	}
	dirs, ok := meta["CloudWatchMetrics"].([]any)
	if !ok || len(dirs) == 0 {
		return nil, fmt.Errorf("_aws.CloudWatchMetrics missing or empty")
	}
	out := map[string]float64{}
	for _, dv := range dirs {
		d, ok := dv.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("directive is not an object")
		}
		ns, _ := d["Namespace"].(string)
		if len(ns) < 1 || len(ns) > 255 {
			return nil, fmt.Errorf("namespace %q", ns)
		}
		sets, ok := d["Dimensions"].([]any)
		if !ok {
			return nil, fmt.Errorf("dimensions missing")
		}
		var first []string
		for i, sv := range sets {
			set, ok := sv.([]any)
			if !ok || len(set) > 30 {
				return nil, fmt.Errorf("dimension set %v", sv)
			}
			for _, kv := range set {
				k, _ := kv.(string)
				v, ok := root[k].(string)
				if !ok || v == "" || len(v) > 1024 {
					return nil, fmt.Errorf("dimension %q has no string member (%v)", k, root[k])
				}
				if i == 0 {
					first = append(first, fmt.Sprintf("%s=%s", k, v))
				}
			}
		}
		sort.Strings(first)
		metrics, ok := d["Metrics"].([]any)
		if !ok || len(metrics) == 0 || len(metrics) > 100 {
			return nil, fmt.Errorf("metrics must hold 1-100 definitions")
		}
		for _, mv := range metrics {
			m, _ := mv.(map[string]any)
			name, _ := m["Name"].(string)
			if len(name) < 1 || len(name) > 255 {
				return nil, fmt.Errorf("metric Name %q", name)
			}
			for k := range m {
				if k != "Name" && k != "Unit" && k != "StorageResolution" {
					return nil, fmt.Errorf("metric definition has member %q", k)
				}
			}
			if u, ok := m["Unit"]; ok && u != "Count" && u != "None" && u != "Seconds" {
				return nil, fmt.Errorf("unit %v", u)
			}
			n, ok := root[name].(json.Number)
			if !ok {
				return nil, fmt.Errorf("metric %q has no number member", name)
			}
			f, _ := n.Float64()
			out[name+"{"+strings.Join(first, ",")+"}"] = f // sorted, as Datum.Key
		}
	}
	return out, nil
}
