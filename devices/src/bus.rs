//! `BusDevice` and `Suspendable`: things that sit on a VMM bus.
