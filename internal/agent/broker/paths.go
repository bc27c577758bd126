package broker

import "strings"

// IMDS serves the same tree under every API version it knows ("latest", "1.0" and dated
// versions such as 2021-03-23), and clients reach it with repeated, trailing or dot
// segments too. The broker classifies, counts and fingerprints on the canonical form, so
// that no spelling of a credential path escapes it; what it forwards is what the client
// sent, untouched.

// Segments splits a decoded URL path into its canonical segments: empty and "."
// segments dropped, ".." resolved (never above the root).
func Segments(p string) []string {
	var segs []string
	for s := range strings.SplitSeq(p, "/") {
		switch s {
		case "", ".":
		case "..":
			if len(segs) > 0 {
				segs = segs[:len(segs)-1]
			}
		default:
			segs = append(segs, s)
		}
	}
	return segs
}

// CanonicalPath is p in canonical form: "/" and the segments Segments keeps.
func CanonicalPath(p string) string {
	return "/" + strings.Join(Segments(p), "/")
}

// isVersion reports whether s names an IMDS API version: latest, 1.0 or a date.
func isVersion(s string) bool {
	if strings.EqualFold(s, "latest") || s == "1.0" {
		return true
	}
	if len(s) != len("2006-01-02") || s[4] != '-' || s[7] != '-' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if i != 4 && i != 7 && (s[i] < '0' || s[i] > '9') {
			return false
		}
	}
	return true
}

// under returns what follows the version segment and want (matched without regard to
// case) in p's canonical segments, or ok false.
func under(p string, want ...string) (rest []string, ok bool) {
	segs := Segments(p)
	if len(segs) < 1+len(want) || !isVersion(segs[0]) {
		return nil, false
	}
	for i, w := range want {
		if !strings.EqualFold(segs[1+i], w) {
			return nil, false
		}
	}
	return segs[1+len(want):], true
}

// IsCredentialPath reports whether an IMDS path hands out role credentials: the
// instance profile's role or the instance's own identity credentials, under any API
// version and however its slashes are spelt.
func IsCredentialPath(p string) bool {
	if rest, ok := under(p, "meta-data", "iam", "security-credentials"); ok && len(rest) == 1 {
		return true
	}
	rest, ok := under(p, "meta-data", "identity-credentials", "ec2", "security-credentials")
	return ok && len(rest) == 1
}

// IsTokenPath reports whether p is where IMDS issues session tokens (PUT
// /latest/api/token), under any version and spelling.
func IsTokenPath(p string) bool {
	rest, ok := under(p, "api", "token")
	return ok && len(rest) == 0
}
