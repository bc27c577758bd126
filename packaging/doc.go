// Package packaging holds no code: its tests prove the files around it. They build the
// deb and rpm packages with nfpm and install, upgrade and remove the deb in a Debian
// root; run the agent under the systemd unit's capability set and system-call filter;
// verify the unit; and parse the AMI-baking templates under ami/.
package packaging
