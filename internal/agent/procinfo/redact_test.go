package procinfo

import (
	"slices"
	"strings"
	"testing"
)

func TestRedactCmdline(t *testing.T) {
	const secret = "AQAEAFsecretTOKENvalue=="
	cases := []struct {
		in, want []string
	}{
		// AWS's own IMDSv2 example.
		{[]string{"curl", "-H", "X-aws-ec2-metadata-token: " + secret, "http://169.254.169.254/latest/meta-data/"},
			[]string{"curl", "-H", "X-aws-ec2-metadata-token: [REDACTED]", "http://169.254.169.254/latest/meta-data/"}},
		{[]string{"curl", "-Hx-aws-ec2-metadata-token:" + secret}, []string{"curl", "-Hx-aws-ec2-metadata-token: [REDACTED]"}},
		{[]string{"wget", "--header=Authorization: Bearer " + secret}, []string{"wget", "--header=Authorization: [REDACTED]"}},
		// The token's TTL header is no secret, and says how the token was asked for.
		{[]string{"curl", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 21600"},
			[]string{"curl", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 21600"}},
		{[]string{"env", "AWS_SECRET_ACCESS_KEY=" + secret, "AWS_SESSION_TOKEN=" + secret, "AWS_ACCESS_KEY_ID=AKIAEXAMPLE", "app"},
			[]string{"env", "AWS_SECRET_ACCESS_KEY=[REDACTED]", "AWS_SESSION_TOKEN=[REDACTED]", "AWS_ACCESS_KEY_ID=AKIAEXAMPLE", "app"}},
		{[]string{"aws", "configure", "set", "--secret-access-key", secret, "--region", "eu-west-1"},
			[]string{"aws", "configure", "set", "--secret-access-key", "[REDACTED]", "--region", "eu-west-1"}},
		{[]string{"tool", "--session-token=" + secret, "-password", secret},
			[]string{"tool", "--session-token=[REDACTED]", "-password", "[REDACTED]"}},
		{[]string{"git", "clone", "https://user:" + secret + "@example.com/r.git"},
			[]string{"git", "clone", "https://user:[REDACTED]@example.com/r.git"}},
		{[]string{"curl", "-s", "http://169.254.169.254/latest/meta-data/"}, []string{"curl", "-s", "http://169.254.169.254/latest/meta-data/"}},
		// AWS's ECS example: curl 169.254.170.2$AWS_CONTAINER_CREDENTIALS_RELATIVE_URI.
		{[]string{"curl", "169.254.170.2/v2/credentials/" + secret}, []string{"curl", "169.254.170.2/v2/credentials/[REDACTED]"}},
		{[]string{"wget", "-qO-", "http://169.254.170.2/v1/credentials?x=1&id=" + secret}, []string{"wget", "-qO-", "http://169.254.170.2/v1/credentials?x=1&id=[REDACTED]"}},
	}
	for _, c := range cases {
		in := slices.Clone(c.in)
		got := RedactCmdline(in)
		if !slices.Equal(got, c.want) {
			t.Errorf("RedactCmdline(%q)\n got %q\nwant %q", c.in, got, c.want)
		}
		if strings.Contains(strings.Join(got, " "), secret) {
			t.Errorf("secret left in %q", got)
		}
		if !slices.Equal(in, c.in) {
			t.Errorf("the input was changed: %q", in)
		}
	}
	if RedactCmdline(nil) != nil {
		t.Error("nil (cmdline unknown) must stay nil")
	}
}
