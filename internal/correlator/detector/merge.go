package detector

import "slices"

// Merge adds what o learned and counted to d, as if d had observed o's records too:
// replicas that read different log files share their evidence this way (each
// replica's records go into a detector of their own, whose snapshot the others merge).
// Counts add up, so a record must reach one of the merged detectors only. o is not
// kept.
func (d *Detector) Merge(o *Detector) {
	for k, c := range o.creds {
		// The same precedence as learning: a key known only from its userIdentity
		// gives way to its AssumeRole record.
		if old, ok := d.creds[k]; !ok || old.Source == "userIdentity" && c.Source != "userIdentity" {
			d.creds[k] = c
		}
	}
	for a, cs := range o.claims {
		for _, c := range cs {
			d.addClaim(a, c)
		}
	}
	for eni, addrs := range o.enis {
		for _, a := range addrs {
			if !slices.Contains(d.enis[eni], a) {
				d.enis[eni] = append(d.enis[eni], a)
			}
		}
	}
	for eni, cs := range o.attaches {
		for _, c := range cs {
			if !slices.Contains(d.attaches[eni], c) {
				d.attaches[eni] = append(d.attaches[eni], c)
			}
		}
	}
	for gk, g := range o.groups {
		mine := d.groups[gk]
		if mine == nil {
			d.groups[gk] = g
			continue
		}
		mine.Count += g.Count
		mine.Errors += g.Errors
		mine.Expired += g.Expired
		if g.First.Before(mine.First) {
			mine.First = g.First
		}
		if g.Last.After(mine.Last) {
			mine.Last = g.Last
		}
		for ck, c := range g.Calls {
			mc := mine.Calls[ck]
			if mc == nil {
				if len(mine.Calls) >= maxCallsPerGroup {
					ck = CallKey{Service: "(other)", Name: "(other)"}
					mc = mine.Calls[ck]
				}
				if mc == nil {
					mc = &CallCount{}
					mine.Calls[ck] = mc
				}
			}
			mc.Count += c.Count
			mc.Errors += c.Errors
		}
	}
	d.pl.merge(&o.pl)
	d.stats.Records += o.stats.Records
	d.stats.Learned += o.stats.Learned
	d.stats.AddressInfo += o.stats.AddressInfo
}

func (p *placement) merge(o *placement) {
	for k, v := range o.allocs {
		p.allocs[k] = v
	}
	for k, v := range o.assocs {
		p.assocs[k] = v
	}
	for _, e := range o.eips {
		if !slices.Contains(p.eips, e) {
			p.eips = append(p.eips, e)
		}
	}
	for k, v := range o.endpoints {
		p.endpoints[k] = v
	}
	for k, v := range o.functions {
		p.functions[k] = v
	}
	for k, v := range o.sessions {
		if _, ok := p.sessions[k]; !ok {
			p.sessions[k] = v
		}
	}
	for key, causes := range o.drops {
		m := p.drops[key]
		if m == nil {
			m = map[string]int64{}
			p.drops[key] = m
		}
		for cause, n := range causes {
			m[cause] += n
		}
	}
}
