//! vhost-user front-end and back-end over Unix sockets with fd passing.
#![deny(missing_docs)]
