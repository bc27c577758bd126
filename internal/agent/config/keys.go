package config

import (
	"fmt"

	"gopkg.in/yaml.v3"
)

// String renders the effective configuration, for check-config.
func (c Config) String() string {
	out, err := yaml.Marshal(c)
	if err != nil {
		return fmt.Sprintf("marshal config: %v", err)
	}
	return string(out)
}
