package config

import "fmt"

// The closed sets of words the configuration takes. Each type knows its words, so a
// typo is a validation error that lists them, and code compares constants, not strings.

// Mode says whether the allowlist and the IMDSv2 rules are applied or only recorded.
type Mode string

const (
	ModeAudit   Mode = "audit"   // record what would be denied, deny nothing
	ModeEnforce Mode = "enforce" // EPERM at connect, 401 for IMDSv1 where a rule requires v2
)

// Enforcing reports whether denials are applied.
func (m Mode) Enforcing() bool { return m == ModeEnforce }

// FailureMode is what the kernel does while the agent is gone.
type FailureMode string

const (
	FailOpen   FailureMode = "open"   // straight to IMDS, still counted
	FailClosed FailureMode = "closed" // EPERM
)

// Action is what a rule, or the default, does with a matching connection.
type Action string

const (
	Allow Action = "allow"
	Deny  Action = "deny"
)

// Allows reports whether the action lets the connection through.
func (a Action) Allows() bool { return a == Allow }

// IMDSv2 is a rule's demand on the IMDS protocol version.
type IMDSv2 string

const (
	IMDSv2Optional IMDSv2 = "optional"
	IMDSv2Required IMDSv2 = "required"
)

// Required reports whether IMDSv1 requests are refused (in enforce mode).
func (v IMDSv2) Required() bool { return v == IMDSv2Required }

// oneOf checks v against its allowed words and says which they are.
func oneOf[T ~string](v T, words ...T) error {
	for _, w := range words {
		if v == w {
			return nil
		}
	}
	var list string
	for i, w := range words {
		if i > 0 {
			list += " or "
		}
		list += fmt.Sprintf("%q", string(w))
	}
	return fmt.Errorf("must be %s, got %q", list, string(v))
}
