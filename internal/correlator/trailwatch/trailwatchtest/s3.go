// Package trailwatchtest is a local S3 stand-in for tests: an http.Handler that decodes
// the AWS SDK's real, signed ListObjectsV2 and GetObject requests (path style) and
// answers in S3's wire format. It checks only that requests are SigV4-signed with the
// access key id AKIDTEST.
package trailwatchtest

import (
	"encoding/xml"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
)

// AccessKeyID is the key id clients must sign with.
const AccessKeyID = "AKIDTEST"

// NewS3 returns an empty bucket.
func NewS3(bucket string) *S3 {
	return &S3{bucket: bucket, objects: map[string]string{}, gets: map[string]int{}}
}

// Put stores an object.
func (f *S3) Put(key, body string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.objects[key] = body
}

// Gets says how often key was fetched.
func (f *S3) Gets(key string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.gets[key]
}

// Lists says how many ListObjectsV2 pages were served (delimiter pages included).
func (f *S3) Lists() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.lists
}

// S3 is a local S3 stand-in that decodes the SDK's real ListObjectsV2 and GetObject
// requests (path style) and answers in S3's wire format.
type S3 struct {
	mu      sync.Mutex
	bucket  string
	objects map[string]string
	gets    map[string]int
	lists   int
}

type listResult struct {
	XMLName               xml.Name `xml:"ListBucketResult"`
	Xmlns                 string   `xml:"xmlns,attr"`
	Name                  string   `xml:"Name"`
	Prefix                string   `xml:"Prefix"`
	KeyCount              int      `xml:"KeyCount"`
	MaxKeys               int      `xml:"MaxKeys"`
	IsTruncated           bool     `xml:"IsTruncated"`
	NextContinuationToken string   `xml:"NextContinuationToken,omitempty"`
	Contents              []struct {
		Key          string `xml:"Key"`
		LastModified string `xml:"LastModified"`
		ETag         string `xml:"ETag"`
		Size         int    `xml:"Size"`
		StorageClass string `xml:"StorageClass"`
	} `xml:"Contents"`
	CommonPrefixes []struct {
		Prefix string `xml:"Prefix"`
	} `xml:"CommonPrefixes"`
}

// ServeHTTP implements http.Handler.
func (f *S3) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !strings.HasPrefix(r.Header.Get("Authorization"), "AWS4-HMAC-SHA256 Credential="+AccessKeyID+"/") {
		http.Error(w, "unsigned request", http.StatusForbidden)
		return
	}
	bucket, key, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/")
	if bucket != f.bucket || r.Method != http.MethodGet {
		http.Error(w, "NoSuchBucket", http.StatusNotFound)
		return
	}
	q := r.URL.Query()
	if key == "" {
		if q.Get("list-type") != "2" {
			http.Error(w, "want ListObjectsV2", http.StatusBadRequest)
			return
		}
		f.lists++
		max, _ := strconv.Atoi(q.Get("max-keys"))
		if max == 0 {
			max = 1000
		}
		// Keys after start-after and the continuation token; with a delimiter, the keys
		// that have it past the prefix roll up into common prefixes.
		prefix, delim := q.Get("prefix"), q.Get("delimiter")
		after := q.Get("start-after")
		if t := q.Get("continuation-token"); t > after {
			after = t
		}
		var keys []string
		common := map[string]bool{}
		for k := range f.objects {
			if !strings.HasPrefix(k, prefix) || k <= after {
				continue
			}
			if i := strings.Index(k[len(prefix):], delim); delim != "" && i >= 0 {
				common[k[:len(prefix)+i+len(delim)]] = true
				continue
			}
			keys = append(keys, k)
		}
		sort.Strings(keys)
		res := listResult{Xmlns: "http://s3.amazonaws.com/doc/2006-03-01/", Name: bucket, Prefix: prefix, MaxKeys: max}
		if len(keys) > max {
			keys, res.IsTruncated, res.NextContinuationToken = keys[:max], true, keys[max-1]
		}
		for cp := range common {
			res.CommonPrefixes = append(res.CommonPrefixes, struct {
				Prefix string `xml:"Prefix"`
			}{cp})
		}
		sort.Slice(res.CommonPrefixes, func(i, j int) bool { return res.CommonPrefixes[i].Prefix < res.CommonPrefixes[j].Prefix })
		for _, k := range keys {
			res.Contents = append(res.Contents, struct {
				Key          string `xml:"Key"`
				LastModified string `xml:"LastModified"`
				ETag         string `xml:"ETag"`
				Size         int    `xml:"Size"`
				StorageClass string `xml:"StorageClass"`
			}{k, "2026-11-20T10:00:00.000Z", fmt.Sprintf("\"%x\"", len(f.objects[k])), len(f.objects[k]), "STANDARD"})
		}
		res.KeyCount = len(res.Contents) + len(res.CommonPrefixes)
		w.Header().Set("Content-Type", "application/xml")
		io.WriteString(w, xml.Header)
		xml.NewEncoder(w).Encode(res)
		return
	}
	body, ok := f.objects[key]
	if !ok {
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, `<?xml version="1.0"?><Error><Code>NoSuchKey</Code><Message>no</Message></Error>`)
		return
	}
	f.gets[key]++
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Header().Set("ETag", fmt.Sprintf("\"%x\"", len(body)))
	io.WriteString(w, body)
}
