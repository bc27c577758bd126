package outputs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/eventbridge"
	"github.com/aws/aws-sdk-go-v2/service/eventbridge/types"
	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
)

// GuardDutyDetailType is the detail-type GuardDuty gives its findings on the default
// bus; our events carry it so that rules written for GuardDuty findings match on it.
const GuardDutyDetailType = "GuardDuty Finding"

// EventBridge puts each unsuppressed changed finding on an event bus with PutEvents, as
// an event shaped like GuardDuty's ("detail-type": "GuardDuty Finding", the detail in
// GuardDuty's finding schema), so rules and automation written for GuardDuty route it.
// AWS reserves "aws.*" sources, so Source is ours: a rule that matches
// "source": ["aws.guardduty"] needs it added.
type EventBridge struct {
	Client *eventbridge.Client
	// Bus is the event bus name or ARN ("default" for the account's default bus).
	Bus    string
	Source string
	Retry  Retry
	Log    zerolog.Logger
}

// Name implements Output.
func (e *EventBridge) Name() string { return "eventbridge" }

// putEventsMax is PutEvents' limit of entries per call.
const putEventsMax = 10

// Deliver implements Output. Entries the bus refused are retried alone, so an event
// the bus accepted is not put again.
func (e *EventBridge) Deliver(ctx context.Context, b *Batch) error {
	var entries []types.PutEventsRequestEntry
	var ids []string
	for _, f := range b.Changed {
		if f.Suppressed {
			continue
		}
		detail, err := json.Marshal(GuardDutyDetail(f, b.Time))
		if err != nil {
			return fmt.Errorf("marshal event detail of %s: %w", f.ID, err)
		}
		entries = append(entries, types.PutEventsRequestEntry{
			EventBusName: aws.String(e.Bus), Source: aws.String(e.Source), DetailType: aws.String(GuardDutyDetailType),
			Detail: aws.String(string(detail)), Time: aws.Time(b.Time), Resources: resourceARNs(f),
		})
		ids = append(ids, f.ID)
	}
	var errs []error
	for len(entries) > 0 {
		n := min(len(entries), putEventsMax)
		if err := e.put(ctx, entries[:n], ids[:n]); err != nil {
			errs = append(errs, err)
			if ctx.Err() != nil {
				break
			}
		}
		entries, ids = entries[n:], ids[n:]
	}
	return errors.Join(errs...)
}

// put sends one call's entries, then again only those that failed.
func (e *EventBridge) put(ctx context.Context, entries []types.PutEventsRequestEntry, ids []string) error {
	pending := entries
	pendingIDs := ids
	return e.Retry.Do(ctx, func(ctx context.Context) error {
		out, err := e.Client.PutEvents(ctx, &eventbridge.PutEventsInput{Entries: pending})
		if err != nil {
			return fmt.Errorf("put events: %w", err)
		}
		if out.FailedEntryCount == 0 {
			return nil
		}
		// Results come in the order of the entries.
		var again []types.PutEventsRequestEntry
		var againIDs []string
		var first string
		for i, r := range out.Entries {
			if i < len(pending) && r.ErrorCode != nil {
				again = append(again, pending[i])
				againIDs = append(againIDs, pendingIDs[i])
				if first == "" {
					first = aws.ToString(r.ErrorCode) + ": " + aws.ToString(r.ErrorMessage)
				}
			}
		}
		if len(again) == 0 { // a count without per-entry errors: send them all again
			return fmt.Errorf("put events: %d entries failed", out.FailedEntryCount)
		}
		pending, pendingIDs = again, againIDs
		return fmt.Errorf("put events: %d entries failed (%s), findings %s", len(again), first, strings.Join(againIDs, ","))
	}, func(attempt int, err error) {
		e.Log.Warn().Str("event", "eventbridge_failed").Int("attempt", attempt).Err(err).Msg("events not put")
	})
}

// resourceARNs are the ARNs a GuardDuty finding event would list: the instance or the
// function whose credential was used.
func resourceARNs(f detector.Finding) []string {
	region := regionOf(f)
	switch {
	case f.InstanceID != "":
		return []string{fmt.Sprintf("arn:aws:ec2:%s:%s:instance/%s", region, f.AccountID, f.InstanceID)}
	case f.FunctionName != "":
		return []string{fmt.Sprintf("arn:aws:lambda:%s:%s:function:%s", region, f.AccountID, f.FunctionName)}
	}
	return nil
}

func regionOf(f detector.Finding) string {
	if f.Region == "" {
		return "us-east-1"
	}
	return f.Region
}

// GuardDutyFinding is a finding in the schema GuardDuty findings have in EventBridge
// events (schemaVersion 2.0), with the fields we can fill.
type GuardDutyFinding struct {
	SchemaVersion string            `json:"schemaVersion"`
	AccountID     string            `json:"accountId"`
	Region        string            `json:"region"`
	Partition     string            `json:"partition"`
	ID            string            `json:"id"`
	Type          string            `json:"type"`
	Resource      GuardDutyResource `json:"resource"`
	Service       GuardDutyService  `json:"service"`
	Severity      float64           `json:"severity"`
	CreatedAt     string            `json:"createdAt"`
	UpdatedAt     string            `json:"updatedAt"`
	Title         string            `json:"title"`
	Description   string            `json:"description"`
}

// GuardDutyResource is the credential and the instance it was issued to.
type GuardDutyResource struct {
	ResourceType     string                    `json:"resourceType"`
	AccessKeyDetails GuardDutyAccessKeyDetails `json:"accessKeyDetails"`
	InstanceDetails  *GuardDutyInstanceDetails `json:"instanceDetails,omitempty"`
	LambdaDetails    *GuardDutyLambdaDetails   `json:"lambdaDetails,omitempty"`
}

// GuardDutyAccessKeyDetails names the key and its role.
type GuardDutyAccessKeyDetails struct {
	AccessKeyID string `json:"accessKeyId"`
	UserName    string `json:"userName,omitempty"`
	UserType    string `json:"userType"`
}

// GuardDutyInstanceDetails names the instance.
type GuardDutyInstanceDetails struct {
	InstanceID string `json:"instanceId"`
}

// GuardDutyLambdaDetails names the function.
type GuardDutyLambdaDetails struct {
	FunctionName string `json:"functionName"`
}

// GuardDutyService is what was seen: the API calls and where they came from.
type GuardDutyService struct {
	ServiceName    string          `json:"serviceName"`
	Action         GuardDutyAction `json:"action"`
	EventFirstSeen string          `json:"eventFirstSeen"`
	EventLastSeen  string          `json:"eventLastSeen"`
	Archived       bool            `json:"archived"`
	Count          int64           `json:"count"`
	// AdditionalInfo carries what only imdsguard knows: the host process, the IMDS
	// version, how the key was tied to its instance.
	AdditionalInfo map[string]any `json:"additionalInfo,omitempty"`
}

// GuardDutyAction is an AWS_API_CALL action.
type GuardDutyAction struct {
	ActionType       string                 `json:"actionType"`
	AWSAPICallAction GuardDutyAPICallAction `json:"awsApiCallAction"`
}

// GuardDutyAPICallAction is the first API called and the caller's address or account.
type GuardDutyAPICallAction struct {
	API                  string                  `json:"api,omitempty"`
	ServiceName          string                  `json:"serviceName,omitempty"`
	CallerType           string                  `json:"callerType"`
	RemoteIPDetails      *GuardDutyRemoteIP      `json:"remoteIpDetails,omitempty"`
	RemoteAccountDetails *GuardDutyRemoteAccount `json:"remoteAccountDetails,omitempty"`
}

// GuardDutyRemoteIP is the source address.
type GuardDutyRemoteIP struct {
	IPAddressV4 string `json:"ipAddressV4,omitempty"`
	IPAddressV6 string `json:"ipAddressV6,omitempty"`
}

// GuardDutyRemoteAccount is the account the calls came from (InsideAWS).
type GuardDutyRemoteAccount struct {
	AccountID  string `json:"accountId"`
	Affiliated bool   `json:"affiliated"`
}

// guardDutySeverity maps our labels onto GuardDuty's numbers (High 7–8.9, Medium 4–6.9,
// Low 1–3.9).
func guardDutySeverity(s string) float64 {
	switch s {
	case detector.High:
		return 8
	case detector.Medium:
		return 5
	default:
		return 2
	}
}

// GuardDutyDetail converts f into GuardDuty's finding schema.
func GuardDutyDetail(f detector.Finding, now time.Time) GuardDutyFinding {
	g := GuardDutyFinding{
		SchemaVersion: "2.0", AccountID: f.AccountID, Region: regionOf(f), Partition: "aws", ID: f.ID, Type: f.Type,
		Severity: guardDutySeverity(f.Severity), CreatedAt: f.FirstSeen.UTC().Format(time.RFC3339Nano), UpdatedAt: now.UTC().Format(time.RFC3339Nano),
		Title:       fmt.Sprintf("Credentials of %s used from %s", owner(f), f.SourceIP),
		Description: truncate(f.Reason, 4096),
		Resource: GuardDutyResource{ResourceType: "AccessKey",
			AccessKeyDetails: GuardDutyAccessKeyDetails{AccessKeyID: f.AccessKeyID, UserName: f.Role, UserType: "AssumedRole"}},
		Service: GuardDutyService{ServiceName: "imdsguard", EventFirstSeen: f.FirstSeen.UTC().Format(time.RFC3339Nano),
			EventLastSeen: f.LastSeen.UTC().Format(time.RFC3339Nano), Count: f.Count,
			Action: GuardDutyAction{ActionType: "AWS_API_CALL", AWSAPICallAction: GuardDutyAPICallAction{CallerType: "Remote IP"}}},
	}
	if f.InstanceID != "" {
		g.Resource.InstanceDetails = &GuardDutyInstanceDetails{InstanceID: f.InstanceID}
	}
	if f.FunctionName != "" {
		g.Resource.LambdaDetails = &GuardDutyLambdaDetails{FunctionName: f.FunctionName}
	}
	a := &g.Service.Action.AWSAPICallAction
	if len(f.APICalls) > 0 {
		a.API, a.ServiceName = f.APICalls[0].Name, f.APICalls[0].Service
	}
	if strings.Contains(f.SourceIP, ":") {
		a.RemoteIPDetails = &GuardDutyRemoteIP{IPAddressV6: f.SourceIP}
	} else if f.SourceIP != "" {
		a.RemoteIPDetails = &GuardDutyRemoteIP{IPAddressV4: f.SourceIP}
	}
	if f.SourceAccountID != "" {
		a.CallerType = "Remote account"
		a.RemoteAccountDetails = &GuardDutyRemoteAccount{AccountID: f.SourceAccountID, Affiliated: f.Severity != detector.High}
	}
	info := map[string]any{"credentialSource": f.CredentialSource}
	if f.IMDSVersion != "" {
		info["imdsVersion"] = f.IMDSVersion
	}
	if len(f.Processes) > 0 {
		info["processes"] = f.Processes
	}
	if f.VPCEndpointID != "" {
		info["vpcEndpointId"] = f.VPCEndpointID
	}
	g.Service.AdditionalInfo = info
	return g
}
