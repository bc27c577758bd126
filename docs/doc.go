// Package docs holds no code: it is the documentation's home, one page per contract, and
// its tests keep the pages true. The tables that mirror code (configuration keys, event
// fields, metric names, finding and wire fields) are checked against the code, and every
// relative link of the README and the pages must lead somewhere.
package docs
