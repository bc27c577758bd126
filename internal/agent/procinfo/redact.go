package procinfo

import (
	"regexp"
	"strings"
)

// Redacted replaces a secret in a recorded command line.
const Redacted = "[REDACTED]"

// AWS documents IMDSv2 as `curl -H "X-aws-ec2-metadata-token: $TOKEN"`: the token is in
// that process's argv, and argv goes into every event (the journal, by default). So
// secrets are cut out of a command line before anything records it:
//   - header values of secret headers, wherever the header sits in an argument
//     ("-HX-aws-ec2-metadata-token: t", "--header=Authorization: Bearer t");
//   - values of environment-like arguments whose name says secret
//     (AWS_SECRET_ACCESS_KEY=…, AWS_SESSION_TOKEN=…, DB_PASSWORD=…);
//   - values of options whose name says secret (--secret-access-key V,
//     --session-token=V, --password V);
//   - passwords in URLs (https://user:secret@host);
//   - ECS task credentials ids in URLs: AWS documents `curl
//     169.254.170.2$AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`, and the id is a bearer
//     secret (/v2/credentials/<id>, /v1/credentials?id=<id>).
var (
	secretHeader = regexp.MustCompile(`(?i)((?:x-aws-ec2-metadata-token|authorization|proxy-authorization|x-amz-security-token|cookie)\s*:).*`)
	secretName   = regexp.MustCompile(`(?i)(secret|token|passw(or)?d|credential|private[-_]?key|session[-_]?key)`)
	envLike      = regexp.MustCompile(`^([A-Za-z_][A-Za-z0-9_]*)=`)
	urlPassword  = regexp.MustCompile(`(://[^/@:\s]+:)[^/@\s]+@`)
	ecsCredsV2   = regexp.MustCompile(`(/v2/credentials/)[^/?#\s]+`)
	ecsCredsV1   = regexp.MustCompile(`(/v1/credentials\?(?:[^#\s]*&)?id=)[^&#\s]+`)
	// notSecret are names that match secretName but hold no secret.
	notSecret = regexp.MustCompile(`(?i)token[-_]?ttl`)
)

// RedactCmdline returns args with secret values replaced by Redacted; args itself is
// not changed.
func RedactCmdline(args []string) []string {
	if args == nil {
		return nil
	}
	out := make([]string, len(args))
	valueNext := false
	for i, a := range args {
		switch {
		case valueNext:
			out[i] = Redacted
			valueNext = false
			continue
		case secretHeader.MatchString(a):
			out[i] = secretHeader.ReplaceAllString(a, "${1} "+Redacted)
			continue
		}
		if m := envLike.FindStringSubmatch(a); m != nil && isSecretName(m[1]) {
			out[i] = m[0] + Redacted
			continue
		}
		if name, ok := strings.CutPrefix(a, "-"); ok && isSecretName(name) {
			if n, _, found := strings.Cut(name, "="); found {
				out[i] = "-" + n + "=" + Redacted
			} else {
				out[i] = a
				valueNext = true
			}
			continue
		}
		a = ecsCredsV2.ReplaceAllString(a, "${1}"+Redacted)
		a = ecsCredsV1.ReplaceAllString(a, "${1}"+Redacted)
		out[i] = urlPassword.ReplaceAllString(a, "${1}"+Redacted+"@")
	}
	return out
}

func isSecretName(name string) bool {
	name, _, _ = strings.Cut(name, "=")
	return secretName.MatchString(name) && !notSecret.MatchString(name)
}
