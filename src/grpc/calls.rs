//! Counts the calls the gRPC server receives, by method, for whoever keeps the metrics (`runner serve`'s
//! `/metrics`). A method is named by its path only when the server has it (from the descriptors it serves), so a
//! caller cannot mint new label values: anything else counts as `other`.

use std::collections::HashSet;
use std::sync::Arc;
use std::task::{Context, Poll};

/// What is told of each call: its method path (e.g. `/runner.v1.ChangeService/CreateChange`) or `other`.
#[derive(Clone)]
pub struct CallCounter(pub Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for CallCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallCounter(…)")
    }
}

/// Every method path of the runner's services and of health.
fn known_methods() -> HashSet<String> {
    use prost::Message;
    let mut known = HashSet::new();
    for set in [
        super::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    known.insert(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    known
}

/// The tower layer: counts, then hands the call on unchanged.
#[derive(Clone)]
pub struct CountLayer {
    counter: Option<CallCounter>,
    known: Arc<HashSet<String>>,
}

impl CountLayer {
    pub fn new(counter: Option<CallCounter>) -> CountLayer {
        CountLayer {
            known: Arc::new(if counter.is_some() {
                known_methods()
            } else {
                HashSet::new()
            }),
            counter,
        }
    }
}

impl<S> tower::Layer<S> for CountLayer {
    type Service = Count<S>;
    fn layer(&self, inner: S) -> Count<S> {
        Count {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Count<S> {
    inner: S,
    layer: CountLayer,
}

impl<S, B> tower::Service<http::Request<B>> for Count<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(counter) = &self.layer.counter {
            let path = request.uri().path();
            (counter.0)(if self.layer.known.contains(path) {
                path
            } else {
                "other"
            });
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_servers_methods_are_known_and_nothing_else() {
        let known = super::known_methods();
        assert!(known.contains("/runner.v1.ChangeService/CreateChange"));
        assert!(known.contains("/grpc.health.v1.Health/Check"));
        assert!(!known.contains("/runner.v1.ChangeService/Nope"));
    }
}
