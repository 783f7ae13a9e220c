//! All integration tests in one binary: real HTTP on loopback, real SQLite
//! files in temp dirs, the simulator as the upstream, and the real binary
//! where a process boundary matters (kill -9, CLI exit codes).

mod application;
mod audit;
mod backup;
mod boundary;
mod budget;
mod cli;
mod config_keys;
mod crash;
mod faults;
mod fetch;
mod helpers;
mod hostile;
mod leases;
mod listing;
mod litestream;
mod manpages;
mod observability;
mod operator;
mod ops;
mod postgres;
mod process;
mod proxy;
mod readme;
mod reconcile;
mod reload;
mod reporting;
mod restart;
mod tls;
mod tools;
mod upgrade;
mod webhook;
