//! A spec-following writer of Remus-shaped streams, for tests and benchmarks only.
//! Placeholder: filled in by the stream owner.
