//! shop-load driven against a fake shop served on 127.0.0.1:0 (real time, each test ≤ ~3 s).

mod fake;
mod run;
