package cloudtrail

import (
	"strings"
	"testing"
)

func TestTimestampWhenEventTimeAbsent(t *testing.T) {
	logstash := strings.Replace(rec1, `"eventTime":"2026-11-20T10:00:00Z"`, `"@timestamp":"2026-11-20T10:00:00.123Z","@version":"1"`, 1)
	both := strings.Replace(rec1, `"eventTime"`, `"@timestamp":"2030-01-01T00:00:00Z","eventTime"`, 1)
	recs, probs, st := read(t, []byte(logstash+"\n"+both+"\n"+`{"@timestamp":"last tuesday"}`+"\n"))
	if st.Records != 2 || st.Malformed != 1 || len(probs) != 1 {
		t.Fatalf("stats %+v problems %v", st, probs)
	}
	if recs[0].Time.Hour() != 10 || recs[0].Time.Nanosecond() != 123e6 {
		t.Fatalf("@timestamp not used: %v", recs[0].Time)
	}
	if recs[1].Time.Year() != 2026 {
		t.Fatalf("eventTime must win over @timestamp: %v", recs[1].Time)
	}
	if !strings.Contains(probs[0].Err.Error(), `bad @timestamp "last tuesday"`) {
		t.Fatalf("problem names the wrong field: %v", probs[0].Err)
	}
}

func parse(t *testing.T, s string) *Record {
	t.Helper()
	recs, probs, _ := read(t, []byte(s))
	if len(recs) != 1 {
		t.Fatalf("%d records, problems %v", len(recs), probs)
	}
	return &recs[0]
}

func TestParseElasticIP(t *testing.T) {
	// Shapes as AWS logs them (the AllocateAddress response is a real record's).
	alloc := parse(t, `{"eventTime":"2023-07-10T12:00:00Z","eventSource":"ec2.amazonaws.com","eventName":"AllocateAddress","requestParameters":{"domain":"vpc"},"responseElements":{"requestId":"r","publicIp":"54.204.150.149","domain":"vpc","allocationId":"eipalloc-09d58d8a1fc361502","publicIpv4Pool":"amazon"}}`)
	e, ok := ParseElasticIP(alloc)
	if !ok || e.PublicIP != "54.204.150.149" || e.AllocationID != "eipalloc-09d58d8a1fc361502" {
		t.Fatalf("allocate: %+v %v", e, ok)
	}
	assoc := parse(t, `{"eventTime":"2023-07-10T12:00:00Z","eventSource":"ec2.amazonaws.com","eventName":"AssociateAddress","requestParameters":{"allocationId":"eipalloc-1","instanceId":"i-0123456789abcdef0","allowReassociation":false},"responseElements":{"requestId":"r","_return":true,"associationId":"eipassoc-1"}}`)
	e, ok = ParseElasticIP(assoc)
	if !ok || e.AllocationID != "eipalloc-1" || e.AssociationID != "eipassoc-1" || e.InstanceID != "i-0123456789abcdef0" || e.PublicIP != "" {
		t.Fatalf("associate: %+v %v", e, ok)
	}
	failed := parse(t, `{"eventTime":"2023-07-10T12:00:00Z","eventSource":"ec2.amazonaws.com","eventName":"ReleaseAddress","errorCode":"InvalidAllocationID.NotFound","requestParameters":{"allocationId":"eipalloc-1"}}`)
	if _, ok := ParseElasticIP(failed); ok {
		t.Fatal("a failed call taught an address change")
	}
}

func TestParseVPCEndpointAndFunction(t *testing.T) {
	ep := parse(t, `{"eventTime":"2023-07-10T12:00:00Z","eventSource":"ec2.amazonaws.com","eventName":"CreateVpcEndpoint","recipientAccountId":"111111111111","responseElements":{"CreateVpcEndpointResponse":{"xmlns":"http://ec2.amazonaws.com/doc/2016-11-15/","vpcEndpoint":{"vpcEndpointId":"vpce-0abc","vpcEndpointType":"Interface"}}}}`)
	v, ok := ParseVPCEndpoint(ep)
	if !ok || v.ID != "vpce-0abc" || v.OwnerID != "111111111111" {
		t.Fatalf("endpoint: %+v %v", v, ok)
	}
	fn := parse(t, `{"eventTime":"2023-07-10T12:25:32Z","eventSource":"lambda.amazonaws.com","eventName":"CreateFunction20150331","recipientAccountId":"999999999999","requestParameters":{"functionName":"f","role":"arn:aws:iam::123837392027:role/old"},"responseElements":{"functionName":"stratus-red-team-backdoor-f-func","functionArn":"arn:aws:lambda:us-east-1:123837392027:function:stratus-red-team-backdoor-f-func","role":"arn:aws:iam::123837392027:role/stratus-red-team-backdoor-f-lambda"}}`)
	f, ok := ParseFunction(fn)
	if !ok || f.Name != "stratus-red-team-backdoor-f-func" || f.AccountID != "123837392027" || f.RoleARN != "arn:aws:iam::123837392027:role/stratus-red-team-backdoor-f-lambda" {
		t.Fatalf("function: %+v %v", f, ok)
	}
	upd := parse(t, `{"eventTime":"2023-07-10T12:25:32Z","eventSource":"lambda.amazonaws.com","eventName":"UpdateFunctionConfiguration20150331v2","recipientAccountId":"111111111111","requestParameters":{"functionName":"g","role":"arn:aws:iam::111111111111:role/r2"},"responseElements":null}`)
	if f, ok := ParseFunction(upd); !ok || f.Name != "g" || f.AccountID != "111111111111" || f.RoleARN != "arn:aws:iam::111111111111:role/r2" {
		t.Fatalf("update: %+v %v", f, ok)
	}
}
