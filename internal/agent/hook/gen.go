package hook

//go:generate go tool bpf2go -tags linux -target amd64,arm64 -type event -type policy -type redirect -type conn_key -type agg_key -type agg -type netns_seen_event -type broker_family -type verdict -type stat -type flag -type rule -output-stem imdsguard imdsguard ../../../bpf/imdsguard.c -- -I../../../bpf/headers -O2 -g -Wall -Werror
