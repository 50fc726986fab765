//! The `supermq` auth backend: the platform's `clients.v1.ClientsService/Authenticate` decides
//! who may connect, `channels.v1.ChannelsService/Authorize` who may publish or subscribe on a
//! channel, and (with the domains service configured) `domains.v1.DomainsService` and
//! `channels.v1.ChannelsService` `RetrieveIDByRoute` turn a non-UUID domain or channel of a
//! topic (a route) into its id. Every answer goes through a [`DecisionCache`]; a service that is down or slower than
//! its timeout makes CONNECT fail as "unavailable" and channel access be refused, never hang.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::cache::{CacheMetrics, CacheSettings, DecisionCache};
use super::{Action, AuthError, Authenticator, Authorizer, Credentials, Identity};
use crate::revocation::DecisionCaches;
use proto::channels::v1::channels_service_client::ChannelsServiceClient;
use proto::channels::v1::AuthzReq;
use proto::clients::v1::clients_service_client::ClientsServiceClient;
use proto::clients::v1::AuthnReq;
use proto::common::v1::{RetrieveEntityRes, RetrieveIdByRouteReq};
use proto::domains::v1::domains_service_client::DomainsServiceClient;

/// Code generated from `proto/` (clients and servers, so tests can stand in for the platform).
pub mod proto {
    pub mod clients {
        pub mod v1 {
            tonic::include_proto!("clients.v1");
        }
    }
    pub mod channels {
        pub mod v1 {
            tonic::include_proto!("channels.v1");
        }
    }
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("common.v1");
        }
    }
    pub mod domains {
        pub mod v1 {
            tonic::include_proto!("domains.v1");
        }
    }
}

/// `AuthzReq.client_type` for devices.
const CLIENT_TYPE: &str = "client";
/// `AuthzReq.type` values.
const AUTHZ_PUBLISH: u32 = 1;
const AUTHZ_SUBSCRIBE: u32 = 2;

/// Where one gRPC service is and how to reach it. `var_prefix` names its environment variables
/// (`SMQ_CLIENTS_GRPC`), so every error says which one to change.
#[derive(Debug, Clone)]
pub struct GrpcService {
    pub var_prefix: &'static str,
    pub url: Option<String>,
    pub timeout: Duration,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub ca_certs: Option<PathBuf>,
}

/// A gRPC setting the adapter cannot start with.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct GrpcConfigError {
    pub var: String,
    pub reason: String,
}

impl GrpcService {
    fn error(&self, suffix: &str, reason: impl Into<String>) -> GrpcConfigError {
        GrpcConfigError {
            var: format!("{}_{suffix}", self.var_prefix),
            reason: reason.into(),
        }
    }

    fn read(&self, suffix: &str, path: &Path) -> Result<Vec<u8>, GrpcConfigError> {
        std::fs::read(path).map_err(|e| self.error(suffix, format!("cannot read {path:?}: {e}")))
    }

    /// A lazily connected channel: start-up does not wait for the service, and a service that
    /// comes back later is reconnected by itself on the next call.
    fn channel(&self) -> Result<Channel, GrpcConfigError> {
        let url = self
            .url
            .as_deref()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| {
                self.error(
                    "URL",
                    "must be set with SMQ_MQTT_ADAPTER_AUTH=supermq (e.g. http://clients:7005)",
                )
            })?;
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| self.error("URL", format!("{url:?} is not a URL: {e}")))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .tcp_nodelay(true);
        let tls_files = self.ca_certs.is_some() || self.client_cert.is_some();
        if self.client_cert.is_some() != self.client_key.is_some() {
            let missing = if self.client_cert.is_some() {
                "CLIENT_KEY"
            } else {
                "CLIENT_CERT"
            };
            return Err(self.error(
                missing,
                "a client certificate needs both _CLIENT_CERT and _CLIENT_KEY",
            ));
        }
        if url.starts_with("https://") || tls_files {
            let mut tls = ClientTlsConfig::new();
            match &self.ca_certs {
                Some(path) => {
                    tls = tls
                        .ca_certificate(Certificate::from_pem(self.read("CLIENT_CA_CERTS", path)?));
                }
                None => tls = tls.with_native_roots(),
            }
            if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    self.read("CLIENT_CERT", cert)?,
                    self.read("CLIENT_KEY", key)?,
                ));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| self.error("URL", format!("TLS setup failed: {e}")))?;
        }
        Ok(endpoint.connect_lazy())
    }
}

/// Why a call to a platform service gave no answer.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Status(tonic::Status),
}

/// Calls the service with a deadline; the answer-shaped refusals (`Unauthenticated`,
/// `PermissionDenied`, `NotFound`, `InvalidArgument`) become a cached denial, anything else
/// (unreachable, overloaded, internal) is a failure that is not cached.
async fn call<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<Option<T>, CallError> {
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(CallError::Timeout(timeout)),
        Ok(Ok(response)) => Ok(Some(response.into_inner())),
        Ok(Err(status)) => match status.code() {
            tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::NotFound
            | tonic::Code::InvalidArgument => Ok(None),
            _ => Err(CallError::Status(status)),
        },
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ChannelAccess {
    domain: String,
    client: String,
    channel: String,
    action: Action,
}

/// A route to resolve: a domain's, or a channel's within a domain (by id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Route {
    Domain(String),
    Channel { domain_id: String, route: String },
}

/// Whether a topic level is an id rather than a route: SuperMQ ids are UUIDs in their
/// canonical form (lowercase, hyphenated); anything else is looked up as a route.
pub fn is_uuid(level: &str) -> bool {
    uuid::Uuid::try_parse(level).is_ok_and(|id| id.hyphenated().to_string() == level)
}

/// The platform's clients and channels services (and, for routes, domains) behind one decision
/// cache each.
pub struct PlatformAuth {
    clients: ClientsServiceClient<Channel>,
    clients_timeout: Duration,
    channels: ChannelsServiceClient<Channel>,
    channels_timeout: Duration,
    /// Set with `SMQ_DOMAINS_GRPC_URL`: routes are resolved; unset, every name is an id.
    domains: Option<(DomainsServiceClient<Channel>, Duration)>,
    authn: DecisionCache<String, Option<String>>,
    authz: DecisionCache<ChannelAccess, bool>,
    /// Route -> id (`None`: unknown route, cached as a denial).
    routes: DecisionCache<Route, Option<String>>,
}

/// Hit/miss counters of both caches.
#[derive(Debug, Clone)]
pub struct PlatformAuthMetrics {
    pub authenticate: Arc<CacheMetrics>,
    pub authorize: Arc<CacheMetrics>,
    pub routes: Arc<CacheMetrics>,
}

impl PlatformAuth {
    /// Builds the clients (no connection is made yet). Must run inside the tokio runtime.
    /// `domains` with a URL turns route resolution on.
    pub fn new(
        clients: &GrpcService,
        channels: &GrpcService,
        domains: &GrpcService,
        cache: CacheSettings,
    ) -> Result<PlatformAuth, GrpcConfigError> {
        let domains = match domains.url.as_deref().filter(|u| !u.is_empty()) {
            Some(_) => Some((
                DomainsServiceClient::new(domains.channel()?),
                domains.timeout,
            )),
            None => None,
        };
        Ok(PlatformAuth {
            clients: ClientsServiceClient::new(clients.channel()?),
            clients_timeout: clients.timeout,
            channels: ChannelsServiceClient::new(channels.channel()?),
            channels_timeout: channels.timeout,
            domains,
            authn: DecisionCache::new(cache),
            authz: DecisionCache::new(cache),
            routes: DecisionCache::new(cache),
        })
    }

    pub fn metrics(&self) -> PlatformAuthMetrics {
        PlatformAuthMetrics {
            authenticate: self.authn.metrics(),
            authorize: self.authz.metrics(),
            routes: self.routes.metrics(),
        }
    }

    /// The id behind `route` (cached); `None` for an unknown route, and for a service that does
    /// not answer (logged, not cached: the next topic asks again).
    async fn resolve(&self, route: Route) -> Option<String> {
        let domains = self.domains.clone();
        let mut channels = self.channels.clone();
        let channels_timeout = self.channels_timeout;
        let key = route.clone();
        let fetch = async move {
            let answer = match route {
                Route::Domain(route) => {
                    let Some((mut client, timeout)) = domains else {
                        return Ok(Some(route));
                    };
                    let request = RetrieveIdByRouteReq {
                        route,
                        domain_id: String::new(),
                    };
                    call(timeout, client.retrieve_id_by_route(request)).await?
                }
                Route::Channel { domain_id, route } => {
                    let request = RetrieveIdByRouteReq { route, domain_id };
                    call(channels_timeout, channels.retrieve_id_by_route(request)).await?
                }
            };
            Ok::<_, CallError>(entity_id(answer))
        };
        match self.routes.get_or_fetch(key.clone(), fetch).await {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(route = ?key, error = %e, "route lookup failed: topic refused");
                None
            }
        }
    }
}

/// The id in a `RetrieveEntityRes`; an empty one is no answer, and one the bus would split
/// (`d1.c.ch1`) is refused and logged: topics naming that route are then refused.
fn entity_id(answer: Option<RetrieveEntityRes>) -> Option<String> {
    answer
        .and_then(|res| res.entity)
        .map(|entity| entity.id)
        .filter(|id| !id.is_empty())
        .filter(|id| match crate::topic::check_bus_name(id) {
            Ok(()) => true,
            Err(why) => {
                tracing::warn!(id = ?id, why, "platform answered a route with an id that is not a single bus subject token: refused");
                false
            }
        })
}

/// The username inside an `AuthnReq.token`, if it decodes.
fn token_username(token: &str) -> Option<String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token.strip_prefix("Basic")?)
        .ok()?;
    let colon = raw.iter().position(|b| *b == b':')?;
    String::from_utf8(raw[..colon].to_vec()).ok()
}

#[async_trait]
impl DecisionCaches for PlatformAuth {
    /// Drops the client's authentications (answered with its id, or tried with its username,
    /// so a denial of the new secret cached before the rotation goes too) and authorizations.
    async fn forget_client(&self, client_id: &str) {
        self.authn
            .forget(|token, id| {
                id.as_deref() == Some(client_id)
                    || token_username(token).is_some_and(|u| u == client_id)
            })
            .await;
        self.authz
            .forget(|access, _| access.client == client_id)
            .await;
    }

    async fn forget_channel(&self, channel_id: &str) {
        self.authz
            .forget(|access, _| access.channel == channel_id)
            .await;
    }

    async fn forget_access(&self, client_id: &str, channel_id: &str) {
        self.authz
            .forget(|access, _| access.client == client_id && access.channel == channel_id)
            .await;
    }
}

/// The `AuthnReq.token` for a username and password: `"Basic"` + base64(`user:pass`) (SPEC §3).
pub fn basic_token(username: &str, password: &[u8]) -> String {
    let mut raw = Vec::with_capacity(username.len() + 1 + password.len());
    raw.extend_from_slice(username.as_bytes());
    raw.push(b':');
    raw.extend_from_slice(password);
    let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
    format!("Basic{encoded}")
}

#[async_trait]
impl Authenticator for PlatformAuth {
    async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Identity, AuthError> {
        if credentials.username.is_none() && credentials.password.is_none() {
            return Err(AuthError::MissingCredentials);
        }
        let username = credentials.username.unwrap_or_default();
        let token = basic_token(username, credentials.password.unwrap_or_default());
        let key = token.clone();
        let mut client = self.clients.clone();
        let timeout = self.clients_timeout;
        let fetch = async move {
            let request = AuthnReq { token };
            call(timeout, client.authenticate(request))
                .await
                .map(|res| res.filter(|r| r.authenticated).map(|r| r.id))
        };
        let authenticated = self
            .authn
            .get_or_fetch(key, fetch)
            .await
            .map_err(|e| AuthError::Unavailable(format!("clients service: {e}")))?;
        match authenticated {
            Some(id) if !id.is_empty() && (username.is_empty() || id == username) => Ok(Identity {
                client_id: id,
                anonymous: false,
            }),
            _ => Err(AuthError::BadCredentials),
        }
    }
}

#[async_trait]
impl Authorizer for PlatformAuth {
    async fn authorize_channel(
        &self,
        who: &Identity,
        domain: &str,
        channel: &str,
        action: Action,
    ) -> bool {
        let key = ChannelAccess {
            domain: domain.to_owned(),
            client: who.client_id.clone(),
            channel: channel.to_owned(),
            action,
        };
        let request = AuthzReq {
            domain_id: key.domain.clone(),
            client_id: key.client.clone(),
            client_type: CLIENT_TYPE.to_owned(),
            channel_id: key.channel.clone(),
            r#type: match action {
                Action::Publish => AUTHZ_PUBLISH,
                Action::Subscribe => AUTHZ_SUBSCRIBE,
            },
        };
        let mut client = self.channels.clone();
        let timeout = self.channels_timeout;
        let fetch = async move {
            call(timeout, client.authorize(request))
                .await
                .map(|res| res.is_some_and(|r| r.authorized))
        };
        match self.authz.get_or_fetch(key, fetch).await {
            Ok(allowed) => allowed,
            Err(e) => {
                tracing::warn!(client_id = %who.client_id.escape_debug(), domain, channel, ?action, error = %e,
                    "channels service unavailable: access refused");
                false
            }
        }
    }

    /// The platform grants channels only; plain topics are never allowed.
    fn authorize_plain(&self, _who: &Identity, _topic_or_filter: &str, _action: Action) -> bool {
        false
    }

    async fn resolve_domain(&self, domain: &str) -> Option<String> {
        if self.domains.is_none() || is_uuid(domain) {
            return Some(domain.to_owned());
        }
        self.resolve(Route::Domain(domain.to_owned())).await
    }

    async fn resolve_channel(&self, domain_id: &str, channel: &str) -> Option<String> {
        if self.domains.is_none() || is_uuid(channel) {
            return Some(channel.to_owned());
        }
        self.resolve(Route::Channel {
            domain_id: domain_id.to_owned(),
            route: channel.to_owned(),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(url: &str) -> GrpcService {
        GrpcService {
            var_prefix: "SMQ_CLIENTS_GRPC",
            url: Some(url.to_owned()),
            timeout: Duration::from_secs(1),
            client_cert: None,
            client_key: None,
            ca_certs: None,
        }
    }

    #[test]
    fn only_canonical_uuids_are_ids() {
        assert!(is_uuid("3fa85f64-5717-4562-b3fc-2c963f66afa6"));
        assert!(!is_uuid("3FA85F64-5717-4562-B3FC-2C963F66AFA6"));
        assert!(!is_uuid("3fa85f6457174562b3fc2c963f66afa6"));
        assert!(!is_uuid("my-domain"));
        assert!(!is_uuid(""));
    }

    #[test]
    fn token_is_basic_then_base64_of_user_colon_pass() {
        assert_eq!(basic_token("c1", b"s1"), "BasicYzE6czE=");
        assert_eq!(
            token_username(&basic_token("c1", b"s:1")).as_deref(),
            Some("c1")
        );
        assert_eq!(token_username("Bearer x"), None);
    }

    #[tokio::test]
    async fn config_errors_name_the_variable() {
        let err = service("not a url").channel().unwrap_err();
        assert_eq!(err.var, "SMQ_CLIENTS_GRPC_URL");
        let mut missing = service("http://127.0.0.1:1");
        missing.url = None;
        assert_eq!(missing.channel().unwrap_err().var, "SMQ_CLIENTS_GRPC_URL");
        let mut no_ca = service("https://127.0.0.1:1");
        no_ca.ca_certs = Some("/nonexistent/ca.pem".into());
        let err = no_ca.channel().unwrap_err();
        assert_eq!(err.var, "SMQ_CLIENTS_GRPC_CLIENT_CA_CERTS");
        assert!(err.reason.contains("/nonexistent/ca.pem"), "{err}");
        let mut half = service("https://127.0.0.1:1");
        half.client_cert = Some("/nonexistent/cert.pem".into());
        assert_eq!(
            half.channel().unwrap_err().var,
            "SMQ_CLIENTS_GRPC_CLIENT_KEY"
        );
    }
}
