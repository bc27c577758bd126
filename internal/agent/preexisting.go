package agent

func (a *agent) reportPreexisting() {}
