//! A stand-in for the platform's gRPC services (the only mock the suite allows): a real tonic
//! server built from the repo's `proto/`, with tables of clients, channel grants and routes
//! (domains and channels `RetrieveIDByRoute`), call counters, an injectable delay, and
//! stop/restart on the same port.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use mqtt_adapter::auth::grpc::proto::channels::v1::channels_service_server::{
    ChannelsService, ChannelsServiceServer,
};
use mqtt_adapter::auth::grpc::proto::channels::v1::{AuthzReq, AuthzRes};
use mqtt_adapter::auth::grpc::proto::clients::v1::clients_service_server::{
    ClientsService, ClientsServiceServer,
};
use mqtt_adapter::auth::grpc::proto::clients::v1::{AuthnReq, AuthnRes};
use mqtt_adapter::auth::grpc::proto::common::v1::{
    EntityBasic, RetrieveEntityRes, RetrieveIdByRouteReq,
};
use mqtt_adapter::auth::grpc::proto::domains::v1::domains_service_server::{
    DomainsService, DomainsServiceServer,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

/// `AuthzReq.type` values of SPEC §3.
pub const PUBLISH: u32 = 1;
pub const SUBSCRIBE: u32 = 2;

/// What the fake platform knows and what it was asked.
#[derive(Default)]
pub struct PlatformState {
    /// username -> (secret, id the service answers with).
    clients: Mutex<HashMap<String, (String, String)>>,
    /// (domain, client id, channel, type).
    grants: Mutex<HashSet<(String, String, String, u32)>>,
    delay: Mutex<Duration>,
    pub authn_calls: AtomicU64,
    pub authz_calls: AtomicU64,
    /// Every Authorize request, in order.
    pub authz_requests: Mutex<Vec<AuthzReq>>,
    /// Domain route -> domain id.
    domain_routes: Mutex<HashMap<String, String>>,
    /// (domain id, channel route) -> channel id.
    channel_routes: Mutex<HashMap<(String, String), String>>,
    /// Every RetrieveIDByRoute request (both services), in order.
    pub route_requests: Mutex<Vec<RetrieveIdByRouteReq>>,
}

impl PlatformState {
    /// A client whose service id is its username.
    pub fn client(&self, id: &str, secret: &str) {
        self.client_answering(id, secret, id);
    }

    /// A client the service authenticates as `answered_id` (to test `id != username`).
    pub fn client_answering(&self, username: &str, secret: &str, answered_id: &str) {
        self.clients.lock().unwrap().insert(
            username.to_owned(),
            (secret.to_owned(), answered_id.to_owned()),
        );
    }

    pub fn grant(&self, domain: &str, client: &str, channel: &str, kind: u32) {
        self.grants.lock().unwrap().insert((
            domain.to_owned(),
            client.to_owned(),
            channel.to_owned(),
            kind,
        ));
    }

    pub fn domain_route(&self, route: &str, id: &str) {
        self.domain_routes
            .lock()
            .unwrap()
            .insert(route.to_owned(), id.to_owned());
    }

    pub fn channel_route(&self, domain_id: &str, route: &str, id: &str) {
        self.channel_routes
            .lock()
            .unwrap()
            .insert((domain_id.to_owned(), route.to_owned()), id.to_owned());
    }

    /// How many RetrieveIDByRoute requests asked for `route`.
    pub fn route_calls(&self, route: &str) -> usize {
        self.route_requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.route == route)
            .count()
    }

    /// Records a RetrieveIDByRoute and answers it: the entity, or `None` (NotFound, as the
    /// platform answers an unknown route).
    fn route_answer(
        &self,
        request: RetrieveIdByRouteReq,
        id: Option<String>,
    ) -> Option<RetrieveEntityRes> {
        let domain_id = request.domain_id.clone();
        self.route_requests.lock().unwrap().push(request);
        id.map(|id| RetrieveEntityRes {
            entity: Some(EntityBasic {
                id,
                domain_id,
                ..EntityBasic::default()
            }),
        })
    }

    /// Every answer waits this long first.
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    pub fn authn_calls(&self) -> u64 {
        self.authn_calls.load(Ordering::SeqCst)
    }

    pub fn authz_calls(&self) -> u64 {
        self.authz_calls.load(Ordering::SeqCst)
    }

    async fn wait(&self) {
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
}

struct Clients(Arc<PlatformState>);
struct Channels(Arc<PlatformState>);
struct Domains(Arc<PlatformState>);

#[tonic::async_trait]
impl DomainsService for Domains {
    async fn retrieve_id_by_route(
        &self,
        request: Request<RetrieveIdByRouteReq>,
    ) -> Result<Response<RetrieveEntityRes>, Status> {
        self.0.wait().await;
        let req = request.into_inner();
        let id = self
            .0
            .domain_routes
            .lock()
            .unwrap()
            .get(&req.route)
            .cloned();
        self.0
            .route_answer(req, id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found("no domain with this route"))
    }
}

#[tonic::async_trait]
impl ClientsService for Clients {
    async fn authenticate(&self, request: Request<AuthnReq>) -> Result<Response<AuthnRes>, Status> {
        self.0.authn_calls.fetch_add(1, Ordering::SeqCst);
        self.0.wait().await;
        let token = request.into_inner().token;
        let decoded = token
            .strip_prefix("Basic")
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| {
                Status::invalid_argument(format!("token {token:?} is not Basic+base64"))
            })?;
        let (user, pass) = decoded.split_once(':').unwrap_or((&decoded, ""));
        let answer = match self.0.clients.lock().unwrap().get(user) {
            Some((secret, id)) if secret == pass => AuthnRes {
                authenticated: true,
                id: id.clone(),
            },
            _ => AuthnRes {
                authenticated: false,
                id: String::new(),
            },
        };
        Ok(Response::new(answer))
    }
}

#[tonic::async_trait]
impl ChannelsService for Channels {
    async fn authorize(&self, request: Request<AuthzReq>) -> Result<Response<AuthzRes>, Status> {
        self.0.authz_calls.fetch_add(1, Ordering::SeqCst);
        self.0.wait().await;
        let req = request.into_inner();
        self.0.authz_requests.lock().unwrap().push(req.clone());
        let key = (
            req.domain_id.clone(),
            req.client_id.clone(),
            req.channel_id.clone(),
            req.r#type,
        );
        let authorized =
            req.client_type == "client" && self.0.grants.lock().unwrap().contains(&key);
        Ok(Response::new(AuthzRes { authorized }))
    }

    async fn retrieve_id_by_route(
        &self,
        request: Request<RetrieveIdByRouteReq>,
    ) -> Result<Response<RetrieveEntityRes>, Status> {
        self.0.wait().await;
        let req = request.into_inner();
        let key = (req.domain_id.clone(), req.route.clone());
        let id = self.0.channel_routes.lock().unwrap().get(&key).cloned();
        self.0
            .route_answer(req, id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found("no channel with this route"))
    }
}

/// The running fake platform (both services on one port).
pub struct Platform {
    pub state: Arc<PlatformState>,
    pub addr: SocketAddr,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Platform {
    pub async fn start() -> Platform {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gRPC port");
        let addr = listener.local_addr().expect("gRPC addr");
        let mut platform = Platform {
            state: Arc::default(),
            addr,
            running: None,
        };
        platform.serve(listener);
        platform
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let incoming = tonic::transport::server::TcpIncoming::from_listener(listener, true, None)
            .expect("incoming");
        let router = tonic::transport::Server::builder()
            .add_service(ClientsServiceServer::new(Clients(self.state.clone())))
            .add_service(ChannelsServiceServer::new(Channels(self.state.clone())))
            .add_service(DomainsServiceServer::new(Domains(self.state.clone())));
        let task = tokio::spawn(async move {
            let _ = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        self.running = Some((stop_tx, task));
    }

    /// The URL the adapter is given.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and closes every connection; the port is free afterwards.
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            // Graceful: open connections get GOAWAY and close, so the adapter sees the outage.
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    /// Serves again on the same port, with the same tables and counters.
    pub async fn restart(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("rebind the gRPC port");
        self.serve(listener);
    }

    /// Environment for an adapter using this platform; decisions are cached for an hour so that
    /// cache assertions never depend on timing.
    pub fn adapter_env(&self) -> Vec<(String, String)> {
        vec![
            ("SMQ_MQTT_ADAPTER_AUTH".into(), "supermq".into()),
            ("SMQ_CLIENTS_GRPC_URL".into(), self.url()),
            ("SMQ_CHANNELS_GRPC_URL".into(), self.url()),
            ("SMQ_MQTT_ADAPTER_AUTH_CACHE_ALLOW_TTL".into(), "1h".into()),
            ("SMQ_MQTT_ADAPTER_AUTH_CACHE_DENY_TTL".into(), "1h".into()),
        ]
    }
}

impl Platform {
    /// [`Platform::adapter_env`] plus the domains service, which turns route resolution on.
    pub fn adapter_env_with_routes(&self) -> Vec<(String, String)> {
        let mut env = self.adapter_env();
        env.push(("SMQ_DOMAINS_GRPC_URL".into(), self.url()));
        env
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        if let Some((_, task)) = self.running.take() {
            task.abort();
        }
    }
}
