//! The static auth backend: clients, channel connections, plain-topic grants and anonymous access
//! read from one TOML file (format in SPEC §3), or a built-in demo registry.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use serde::Deserialize;
use toml::Spanned;

use super::{Action, AuthError, Authenticator, Authorizer, Credentials, Identity};
use crate::revocation::Revocation;

/// A registry file that cannot be used, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read clients file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("clients file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("clients file {path}: {message}")]
    Incomplete {
        path: PathBuf,
        message: &'static str,
    },
    #[error("clients file {path}, line {line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    clients: Vec<ClientEntry>,
    #[serde(default)]
    connections: Vec<ConnectionEntry>,
    #[serde(default)]
    acl: Vec<AclEntry>,
    anonymous: Option<AnonymousEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    id: Spanned<String>,
    secret: String,
    #[allow(dead_code)] // part of the file format; shown nowhere yet
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionEntry {
    client: Spanned<String>,
    domain: String,
    channel: String,
    /// A route (alias) topics may use instead of `domain`.
    domain_route: Option<String>,
    /// A route (alias) topics may use instead of `channel`, within the domain.
    channel_route: Option<String>,
    actions: Vec<ActionName>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AclEntry {
    client: Spanned<String>,
    topics: Vec<String>,
    actions: Vec<ActionName>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnonymousEntry {
    topics: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ActionName {
    Publish,
    Subscribe,
}

impl From<ActionName> for Action {
    fn from(name: ActionName) -> Self {
        match name {
            ActionName::Publish => Action::Publish,
            ActionName::Subscribe => Action::Subscribe,
        }
    }
}

/// One version of the registry's content; answers authentication and authorization from memory.
#[derive(Debug, Default)]
pub struct Grants {
    secrets: HashMap<String, String>,
    channels: HashSet<(String, String, String, Action)>,
    plain: HashMap<String, Vec<(String, Action)>>,
    anonymous: Option<Vec<String>>,
    /// Domain route -> domain id.
    domain_routes: HashMap<String, String>,
    /// (domain id, channel route) -> channel id.
    channel_routes: HashMap<(String, String), String>,
}

/// Client ids and secrets of the built-in demo registry, also printed at start-up.
pub const DEMO_DOMAIN: &str = "demo-domain";
pub const DEMO_CHANNEL: &str = "demo-channel";
pub const DEMO_CLIENTS: [(&str, &str); 2] = [
    ("demo-sensor", "demo-sensor-secret"),
    ("demo-app", "demo-app-secret"),
];

impl Grants {
    /// Loads and validates a registry file.
    pub fn from_file(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses registry text; `path` only names the source in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, RegistryError> {
        let file: RegistryFile = toml::from_str(text).map_err(|e| RegistryError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let invalid = |span: std::ops::Range<usize>, message: String| RegistryError::Invalid {
            path: path.to_owned(),
            line: text[..span.start.min(text.len())].matches('\n').count() + 1,
            message,
        };

        let mut registry = Grants::default();
        for client in &file.clients {
            let id = client.id.get_ref();
            if id.is_empty() {
                return Err(invalid(
                    client.id.span(),
                    "client id must not be empty".into(),
                ));
            }
            if registry
                .secrets
                .insert(id.clone(), client.secret.clone())
                .is_some()
            {
                return Err(invalid(
                    client.id.span(),
                    format!("duplicate client id {id:?}"),
                ));
            }
        }
        for conn in &file.connections {
            let client = conn.client.get_ref();
            if !registry.secrets.contains_key(client) {
                return Err(invalid(
                    conn.client.span(),
                    format!("connection names unknown client {client:?}"),
                ));
            }
            // A name the bus would split or merge (`d1.c.ch1`) could reach another tenant's
            // channel through another instance: refused, with the field that holds it.
            for (field, name) in [
                ("domain", Some(&conn.domain)),
                ("channel", Some(&conn.channel)),
                ("domain_route", conn.domain_route.as_ref()),
                ("channel_route", conn.channel_route.as_ref()),
            ] {
                if let Some(Err(why)) = name.map(|n| crate::topic::check_bus_name(n)) {
                    return Err(invalid(
                        conn.client.span(),
                        format!(
                            "{field} {name:?} {why}",
                            name = name.map_or("", |n| n.as_str())
                        ),
                    ));
                }
            }
            if let Some(route) = &conn.domain_route {
                let known = registry
                    .domain_routes
                    .entry(route.clone())
                    .or_insert_with(|| conn.domain.clone());
                if *known != conn.domain {
                    return Err(invalid(
                        conn.client.span(),
                        format!(
                            "domain_route {route:?} names domain {:?} here and {known:?} before",
                            conn.domain
                        ),
                    ));
                }
            }
            if let Some(route) = &conn.channel_route {
                let known = registry
                    .channel_routes
                    .entry((conn.domain.clone(), route.clone()))
                    .or_insert_with(|| conn.channel.clone());
                if *known != conn.channel {
                    return Err(invalid(
                        conn.client.span(),
                        format!(
                            "channel_route {route:?} of domain {:?} names channel {:?} here and {known:?} before",
                            conn.domain, conn.channel
                        ),
                    ));
                }
            }
            for action in &conn.actions {
                registry.channels.insert((
                    client.clone(),
                    conn.domain.clone(),
                    conn.channel.clone(),
                    (*action).into(),
                ));
            }
        }
        for acl in &file.acl {
            let client = acl.client.get_ref();
            if !registry.secrets.contains_key(client) {
                return Err(invalid(
                    acl.client.span(),
                    format!("acl names unknown client {client:?}"),
                ));
            }
            for filter in &acl.topics {
                if !rumqttd::protocol::valid_filter(filter) {
                    return Err(invalid(
                        acl.client.span(),
                        format!("acl topic {filter:?} is not a valid MQTT filter"),
                    ));
                }
                let grants = registry.plain.entry(client.clone()).or_default();
                grants.extend(acl.actions.iter().map(|a| (filter.clone(), (*a).into())));
            }
        }
        registry.anonymous = file.anonymous.map(|a| a.topics);
        Ok(registry)
    }

    /// How many clients it knows.
    pub fn clients(&self) -> usize {
        self.secrets.len()
    }

    /// Reads a file for a reload, which, unlike the start-up, refuses a registry with no
    /// clients, and one whose last line is incomplete: both are what a reader sees of a file
    /// being written in place, and serving one would revoke every session at once.
    fn for_reload(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.to_owned(),
            source,
        })?;
        let incomplete = |message| RegistryError::Incomplete {
            path: path.to_owned(),
            message,
        };
        if text.trim().is_empty() {
            return Err(incomplete(
                "empty (a write in progress?): a reload needs at least one client; write the new \
                 file elsewhere and rename it into place",
            ));
        }
        if !text.ends_with('\n') {
            return Err(incomplete(
                "the last line has no newline (a write in progress?); write the new file \
                 elsewhere and rename it into place",
            ));
        }
        let grants = Self::from_toml(&text, path)?;
        if grants.clients() == 0 {
            return Err(incomplete(
                "no [[clients]] (a truncated file?): a reload needs at least one client",
            ));
        }
        Ok(grants)
    }

    /// The demo registry used when no file is given: two clients sharing one channel.
    pub fn demo() -> Self {
        let mut registry = Grants::default();
        for (id, secret) in DEMO_CLIENTS {
            registry.secrets.insert(id.into(), secret.into());
            for action in [Action::Publish, Action::Subscribe] {
                registry.channels.insert((
                    id.into(),
                    DEMO_DOMAIN.into(),
                    DEMO_CHANNEL.into(),
                    action,
                ));
            }
        }
        registry
    }
}

/// The static backend: the registry behind a swappable pointer, so SIGHUP can replace it while
/// sessions keep asking (each check takes the current version).
#[derive(Debug)]
pub struct StaticRegistry {
    current: RwLock<Arc<Grants>>,
}

impl StaticRegistry {
    fn new(grants: Grants) -> Self {
        StaticRegistry {
            current: RwLock::new(Arc::new(grants)),
        }
    }

    /// Loads and validates a registry file.
    pub fn from_file(path: &Path) -> Result<Self, RegistryError> {
        Grants::from_file(path).map(Self::new)
    }

    /// Parses registry text; `path` only names the source in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, RegistryError> {
        Grants::from_toml(text, path).map(Self::new)
    }

    /// The demo registry used when no file is given: two clients sharing one channel.
    pub fn demo() -> Self {
        Self::new(Grants::demo())
    }

    /// How many clients the registry in force knows.
    pub fn clients(&self) -> usize {
        self.current().clients()
    }

    fn current(&self) -> Arc<Grants> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the file again and, if it is valid, serves it from now on; returns what the old
    /// registry granted and the new one does not. An invalid file changes nothing.
    pub fn reload(&self, path: &Path) -> Result<Vec<Revocation>, RegistryError> {
        let new = Grants::for_reload(path)?;
        let old = self.current();
        let lost = old.lost_in(&new);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        Ok(lost)
    }

    /// Ready-to-paste client command lines that work against the demo registry.
    pub fn demo_commands(port: u16) -> [String; 2] {
        let (pub_id, pub_secret) = DEMO_CLIENTS[0];
        let (sub_id, sub_secret) = DEMO_CLIENTS[1];
        [
            format!(
                "mosquitto_sub -h 127.0.0.1 -p {port} -i {sub_id} -u {sub_id} -P {sub_secret} -t 'm/{DEMO_DOMAIN}/c/{DEMO_CHANNEL}/#' -v"
            ),
            format!(
                "mosquitto_pub -h 127.0.0.1 -p {port} -i {pub_id} -u {pub_id} -P {pub_secret} -t m/{DEMO_DOMAIN}/c/{DEMO_CHANNEL}/temperature -m 21.5"
            ),
        ]
    }
}

impl Grants {
    /// Clients that are gone or have another secret, and (client, channel) connections that lost
    /// an action, as revocations.
    fn lost_in(&self, new: &Grants) -> Vec<Revocation> {
        let mut revoked_clients = HashSet::new();
        let mut lost = Vec::new();
        let mut ids: Vec<&String> = self.secrets.keys().collect();
        ids.sort_unstable();
        for id in ids {
            if new.secrets.get(id) != self.secrets.get(id) {
                revoked_clients.insert(id.as_str());
                lost.push(Revocation::Client {
                    client_id: id.clone(),
                });
            }
        }
        let mut pairs: Vec<(&str, &str)> = self
            .channels
            .iter()
            .filter(|grant| !new.channels.contains(*grant))
            .map(|(client, _, channel, _)| (client.as_str(), channel.as_str()))
            .filter(|(client, _)| !revoked_clients.contains(client))
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        lost.extend(
            pairs
                .into_iter()
                .map(|(client, channel)| Revocation::Access {
                    client_id: client.to_owned(),
                    channel_id: channel.to_owned(),
                }),
        );
        lost
    }
}

#[async_trait]
impl Authenticator for StaticRegistry {
    async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Identity, AuthError> {
        self.current().authenticate(credentials).await
    }
}

#[async_trait]
impl Authorizer for StaticRegistry {
    async fn authorize_channel(
        &self,
        who: &Identity,
        domain: &str,
        channel: &str,
        action: Action,
    ) -> bool {
        self.current()
            .authorize_channel(who, domain, channel, action)
            .await
    }

    fn authorize_plain(&self, who: &Identity, topic_or_filter: &str, action: Action) -> bool {
        self.current().authorize_plain(who, topic_or_filter, action)
    }

    async fn resolve_domain(&self, domain: &str) -> Option<String> {
        self.current().resolve_domain(domain).await
    }

    async fn resolve_channel(&self, domain_id: &str, channel: &str) -> Option<String> {
        self.current().resolve_channel(domain_id, channel).await
    }
}

/// Compares secrets without an early exit, so timing does not reveal a matching prefix.
fn secrets_match(a: &str, b: &[u8]) -> bool {
    super::constant_time_eq(a.as_bytes(), b)
}

#[async_trait]
impl Authenticator for Grants {
    async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Identity, AuthError> {
        match credentials.username {
            None | Some("") if self.anonymous.is_some() => Ok(Identity {
                client_id: String::new(),
                anonymous: true,
            }),
            None | Some("") => Err(AuthError::MissingCredentials),
            Some(username) => {
                let password = credentials.password.unwrap_or_default();
                match self.secrets.get(username) {
                    Some(secret) if secrets_match(secret, password) => Ok(Identity {
                        client_id: username.to_owned(),
                        anonymous: false,
                    }),
                    _ => Err(AuthError::BadCredentials),
                }
            }
        }
    }
}

#[async_trait]
impl Authorizer for Grants {
    async fn authorize_channel(
        &self,
        who: &Identity,
        domain: &str,
        channel: &str,
        action: Action,
    ) -> bool {
        // Borrowed lookup would need a custom key type; channel checks are cached per session.
        self.channels.contains(&(
            who.client_id.clone(),
            domain.to_owned(),
            channel.to_owned(),
            action,
        ))
    }

    fn authorize_plain(&self, who: &Identity, topic_or_filter: &str, action: Action) -> bool {
        if who.anonymous {
            return self.anonymous.as_ref().is_some_and(|filters| {
                filters
                    .iter()
                    .any(|f| crate::topic::matches(topic_or_filter, f))
            });
        }
        self.plain.get(&who.client_id).is_some_and(|grants| {
            grants
                .iter()
                .any(|(f, a)| *a == action && crate::topic::matches(topic_or_filter, f))
        })
    }

    /// A `domain_route` of the file becomes its domain; any other name is taken as the id.
    async fn resolve_domain(&self, domain: &str) -> Option<String> {
        Some(
            self.domain_routes
                .get(domain)
                .cloned()
                .unwrap_or_else(|| domain.to_owned()),
        )
    }

    async fn resolve_channel(&self, domain_id: &str, channel: &str) -> Option<String> {
        let key = (domain_id.to_owned(), channel.to_owned());
        Some(
            self.channel_routes
                .get(&key)
                .cloned()
                .unwrap_or_else(|| channel.to_owned()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[clients]]
id = "c1"
secret = "s1"
name = "sensor-1"

[[connections]]
client = "c1"
domain = "d1"
channel = "ch1"
actions = ["publish"]

[[acl]]
client = "c1"
topics = ["sensors/#"]
actions = ["subscribe"]
"#;

    fn id(client: &str) -> Identity {
        Identity {
            client_id: client.into(),
            anonymous: false,
        }
    }

    #[tokio::test]
    async fn authenticates_by_secret() {
        let r = StaticRegistry::from_toml(FILE, Path::new("f.toml")).unwrap();
        let ok = Credentials {
            username: Some("c1"),
            password: Some(b"s1"),
        };
        assert_eq!(r.authenticate(ok).await, Ok(id("c1")));
        let bad = Credentials {
            username: Some("c1"),
            password: Some(b"s2"),
        };
        assert_eq!(r.authenticate(bad).await, Err(AuthError::BadCredentials));
        let none = Credentials {
            username: None,
            password: None,
        };
        assert_eq!(
            r.authenticate(none).await,
            Err(AuthError::MissingCredentials)
        );
    }

    #[tokio::test]
    async fn authorizes_channels_and_plain_topics_per_action() {
        let r = StaticRegistry::from_toml(FILE, Path::new("f.toml")).unwrap();
        assert!(
            r.authorize_channel(&id("c1"), "d1", "ch1", Action::Publish)
                .await
        );
        assert!(
            !r.authorize_channel(&id("c1"), "d1", "ch1", Action::Subscribe)
                .await
        );
        assert!(
            !r.authorize_channel(&id("c1"), "d1", "ch2", Action::Publish)
                .await
        );
        assert!(r.authorize_plain(&id("c1"), "sensors/+", Action::Subscribe));
        assert!(!r.authorize_plain(&id("c1"), "sensors/t", Action::Publish));
        assert!(!r.authorize_plain(&id("c1"), "#", Action::Subscribe));
    }

    #[tokio::test]
    async fn reload_reports_what_is_no_longer_granted_and_keeps_the_old_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clients.toml");
        let two = format!(
            "{FILE}\n[[clients]]\nid = \"c2\"\nsecret = \"s2\"\n[[connections]]\nclient = \"c2\"\ndomain = \"d1\"\nchannel = \"ch1\"\nactions = [\"publish\", \"subscribe\"]\n"
        );
        std::fs::write(&path, &two).unwrap();
        let r = StaticRegistry::from_file(&path).unwrap();
        // c1 loses its channel (keeps its secret), c2 gets a new secret.
        let next = two
            .replace("actions = [\"publish\"]\n", "actions = []\n")
            .replace("secret = \"s2\"", "secret = \"rotated\"");
        std::fs::write(&path, next).unwrap();
        let lost = r.reload(&path).unwrap();
        assert_eq!(
            lost,
            [
                Revocation::Client {
                    client_id: "c2".into()
                },
                Revocation::Access {
                    client_id: "c1".into(),
                    channel_id: "ch1".into()
                }
            ]
        );
        assert!(
            !r.authorize_channel(&id("c1"), "d1", "ch1", Action::Publish)
                .await
        );
        std::fs::write(&path, "[[clients]]\nid = \"x\"\nbogus = 1\n").unwrap();
        let err = r.reload(&path).unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
        let ok = Credentials {
            username: Some("c2"),
            password: Some(b"rotated"),
        };
        assert_eq!(r.authenticate(ok).await, Ok(id("c2")), "old registry kept");
    }

    #[test]
    fn errors_name_the_line() {
        let dup =
            "[[clients]]\nid = \"a\"\nsecret = \"x\"\n[[clients]]\nid = \"a\"\nsecret = \"y\"\n";
        let err = StaticRegistry::from_toml(dup, Path::new("f.toml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "clients file f.toml, line 5: duplicate client id \"a\""
        );
        let unknown = "[[clients]]\nid = \"a\"\nsecret = \"x\"\n[[connections]]\nclient = \"b\"\ndomain = \"d\"\nchannel = \"c\"\nactions = []\n";
        let err = StaticRegistry::from_toml(unknown, Path::new("f.toml")).unwrap_err();
        assert!(err.to_string().contains("line 5"), "{err}");
        let extra = "[[clients]]\nid = \"a\"\nsecret = \"x\"\ncolour = \"red\"\n";
        let err = StaticRegistry::from_toml(extra, Path::new("f.toml")).unwrap_err();
        assert!(err.to_string().contains("line 4"), "{err}");
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn names_the_bus_would_split_are_refused_with_their_line() {
        for (field, bad) in [
            ("domain", "d1.c.ch1"),
            ("channel", "z*"),
            ("channel", "a>"),
            ("domain", "d 1"),
            ("channel", "ch\\u0001"),
            ("domain_route", "home.x"),
            ("channel_route", "a\\tb"),
        ] {
            let (domain, channel, route) = match field {
                "domain" => (bad, "ch1", String::new()),
                "channel" => ("d1", bad, String::new()),
                _ => ("d1", "ch1", format!("{field} = \"{bad}\"\n")),
            };
            let conn = format!("domain = \"{domain}\"\nchannel = \"{channel}\"\n{route}");
            let text = format!(
                "[[clients]]\nid = \"a\"\nsecret = \"x\"\n[[connections]]\nclient = \"a\"\n{conn}actions = []\n"
            );
            let err = StaticRegistry::from_toml(&text, Path::new("f.toml")).unwrap_err();
            let err = err.to_string();
            assert!(err.contains("line 5"), "{err}");
            assert!(err.contains(field), "{err}");
        }
    }

    #[tokio::test]
    async fn a_reload_refuses_an_empty_or_truncated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clients.toml");
        std::fs::write(&path, FILE).unwrap();
        let r = StaticRegistry::from_file(&path).unwrap();
        for broken in [
            "",
            "\n  \n",
            "# clients\n",
            "[anonymous]\ntopics = [\"public/#\"]\n",
            FILE.trim_end(),
        ] {
            std::fs::write(&path, broken).unwrap();
            let err = r.reload(&path).unwrap_err();
            assert!(
                matches!(err, RegistryError::Incomplete { .. }),
                "{broken:?}: {err}"
            );
        }
        let ok = Credentials {
            username: Some("c1"),
            password: Some(b"s1"),
        };
        assert_eq!(r.authenticate(ok).await, Ok(id("c1")), "old registry kept");
        // At start-up, a registry without clients is allowed (the server warns).
        std::fs::write(&path, "").unwrap();
        assert_eq!(StaticRegistry::from_file(&path).unwrap().clients(), 0);
    }

    const ROUTES: &str = r#"
[[clients]]
id = "c1"
secret = "s1"

[[connections]]
client = "c1"
domain = "d-id"
channel = "ch-id"
domain_route = "home"
channel_route = "kitchen"
actions = ["publish", "subscribe"]
"#;

    #[tokio::test]
    async fn routes_resolve_to_ids_before_authorization() {
        use crate::auth::{authorize_topic, TopicDecision};
        use crate::topic::Usage;
        let r = StaticRegistry::from_toml(ROUTES, Path::new("f.toml")).unwrap();
        let allowed = |topic: &str| TopicDecision::Allow(topic.to_owned());
        for (topic, usage, expected) in [
            ("m/home/c/kitchen/t", Usage::Publish, "m/d-id/c/ch-id/t"),
            ("m/d-id/c/kitchen/#", Usage::Subscribe, "m/d-id/c/ch-id/#"),
            ("m/home/c/ch-id", Usage::Publish, "m/d-id/c/ch-id"),
            ("hc/home", Usage::Publish, "hc/d-id"),
        ] {
            assert_eq!(
                authorize_topic(&r, &id("c1"), topic, usage).await,
                allowed(expected),
                "{topic}"
            );
        }
        assert_eq!(
            authorize_topic(&r, &id("c1"), "m/home/c/cellar/t", Usage::Publish).await,
            TopicDecision::Deny
        );
        assert_eq!(
            crate::auth::canonical_filter(&r, "m/home/c/kitchen/#").await,
            "m/d-id/c/ch-id/#"
        );
    }

    #[test]
    fn a_route_naming_two_ids_is_an_error_with_its_line() {
        let twice = format!(
            "{ROUTES}\n[[connections]]\nclient = \"c1\"\ndomain = \"other\"\nchannel = \"x\"\ndomain_route = \"home\"\nactions = [\"publish\"]\n"
        );
        let err = StaticRegistry::from_toml(&twice, Path::new("f.toml")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("domain_route \"home\""), "{text}");
        assert!(text.contains("line 15"), "{text}");
    }
}
