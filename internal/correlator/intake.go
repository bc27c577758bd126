package correlator

import (
	"crypto/x509"
	"fmt"

	"github.com/imdsguard/imdsguard/internal/correlator/config"
	"github.com/imdsguard/imdsguard/internal/correlator/iddoc"
	"github.com/imdsguard/imdsguard/internal/correlator/intake"
)

// newIntake makes the fingerprint store the detector's and returns the intake server
// (a serve component).
func newIntake(e *env, st intake.Store) (*intake.Server, error) {
	c := e.cfg.Intake
	certs, err := intakeCertificates(c)
	if err != nil {
		return nil, err
	}
	h := intake.NewHandler(intake.Options{Store: st, AWSCertificates: certs, AllowedAccounts: c.AllowedAccounts, Log: e.log})
	srv, err := intake.NewServer(serverConfig(c), h, e.log)
	if err != nil {
		return nil, err
	}
	e.stored = st
	return srv, nil
}

func serverConfig(c config.Intake) intake.ServerConfig {
	return intake.ServerConfig{Listen: c.Listen, TLSCert: c.TLSCert, TLSKey: c.TLSKey, ClientCA: c.ClientCA, PlainHTTP: c.PlainHTTP, PurgeGrace: c.PurgeGrace}
}

func intakeCertificates(c config.Intake) ([]*x509.Certificate, error) {
	if len(c.AWSCertificates) == 0 {
		return nil, nil
	}
	certs, err := iddoc.LoadCertificates(c.AWSCertificates...)
	if err != nil {
		return nil, fmt.Errorf("intake.aws_certificates: %w", err)
	}
	return certs, nil
}

// checkIntake loads what the intake would load at start, for check-config.
func checkIntake(c config.Intake) error {
	if c.Listen == "" {
		return nil
	}
	if _, err := intakeCertificates(c); err != nil {
		return err
	}
	if c.PlainHTTP {
		return intake.CheckLoopback(c.Listen)
	}
	if _, err := intake.TLSConfig(serverConfig(c)); err != nil {
		return fmt.Errorf("intake: %w", err)
	}
	return nil
}
