//! A minijail-equivalent `Jail`, fork into a jailed child, and `ProxyDevice`.
#![deny(missing_docs)]
