package broker

import "strings"

// IsCredentialPath reports whether an IMDS path hands out role credentials: the
// instance profile's role or the instance's own identity credentials.
func IsCredentialPath(p string) bool {
	for _, prefix := range []string{
		"/latest/meta-data/iam/security-credentials/",
		"/latest/meta-data/identity-credentials/ec2/security-credentials/",
	} {
		if rest, ok := strings.CutPrefix(p, prefix); ok && rest != "" && !strings.Contains(strings.TrimSuffix(rest, "/"), "/") {
			return true
		}
	}
	return false
}
