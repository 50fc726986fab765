//! Who may connect and what they may touch: the `Authenticator` (CONNECT) and `Authorizer`
//! (channel and plain-topic access) traits, and the SuperMQ topic rules that decide which check a
//! PUBLISH topic or SUBSCRIBE filter needs.

pub mod ban;
pub mod cache;
pub mod grpc;
pub mod static_registry;

use async_trait::async_trait;

use crate::topic::{self, ChannelTopic, TopicError, TopicKind, Usage};

pub use static_registry::StaticRegistry;

/// Compares secrets in time independent of where they differ (only of their lengths).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The identity a CONNECT was accepted as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The platform's client id (the MQTT username); empty for an anonymous session.
    pub client_id: String,
    pub anonymous: bool,
}

/// What the device presented in its CONNECT.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    pub username: Option<&'a str>,
    /// Binary data (MQTT 3.1.3.5): compared as bytes, never required to be UTF-8.
    pub password: Option<&'a [u8]>,
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("bad username or password")]
    BadCredentials,
    #[error("no username given and anonymous access is off")]
    MissingCredentials,
    #[error("authentication service unavailable: {0}")]
    Unavailable(String),
}

/// What a client wants to do on a channel or topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Publish,
    Subscribe,
}

impl From<Usage> for Action {
    fn from(usage: Usage) -> Self {
        match usage {
            Usage::Publish => Action::Publish,
            Usage::Subscribe => Action::Subscribe,
        }
    }
}

/// Checks a CONNECT's credentials.
#[async_trait]
pub trait Authenticator: Send + Sync {
    async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Identity, AuthError>;
}

/// Decides access to channels and to plain (non-SuperMQ) topics.
#[async_trait]
pub trait Authorizer: Send + Sync {
    /// May `who` perform `action` on channel `channel` of `domain`?
    async fn authorize_channel(
        &self,
        who: &Identity,
        domain: &str,
        channel: &str,
        action: Action,
    ) -> bool;

    /// May `who` perform `action` on a plain topic (PUBLISH) or filter (SUBSCRIBE)?
    fn authorize_plain(&self, who: &Identity, topic_or_filter: &str, action: Action) -> bool;

    /// The id of the domain a topic names, which may be a route (a human-readable alias of the
    /// id); `None`: an unknown route. Backends without routes return the name unchanged.
    async fn resolve_domain(&self, domain: &str) -> Option<String> {
        Some(domain.to_owned())
    }

    /// The id of the channel a topic names within domain `domain_id` (already resolved), which
    /// may be a route; `None`: an unknown route.
    async fn resolve_channel(&self, _domain_id: &str, channel: &str) -> Option<String> {
        Some(channel.to_owned())
    }
}

/// The channel topic with its domain and channel resolved to ids; `None` when either is an
/// unknown route.
/// An id the bus would split (a backend answering `d1.c.ch1` for a route) is refused and logged,
/// as an unknown route is.
async fn resolve_ids(authorizer: &dyn Authorizer, channel: ChannelTopic) -> Option<ChannelTopic> {
    let domain = authorizer.resolve_domain(&channel.domain).await?;
    let id = authorizer
        .resolve_channel(&domain, &channel.channel)
        .await?;
    for (kind, name) in [("domain", &domain), ("channel", &id)] {
        if let Err(why) = topic::check_bus_name(name) {
            tracing::warn!(kind, id = ?name, why, "resolved id refused: not a single bus subject token");
            return None;
        }
    }
    Some(ChannelTopic {
        domain,
        channel: id,
        subtopic: channel.subtopic,
    })
}

/// The filter an UNSUBSCRIBE removes: the canonical, id-resolved form under which SUBSCRIBE
/// stored it (an unknown route or a malformed filter is returned as given: it matches nothing).
pub async fn canonical_filter(authorizer: &dyn Authorizer, filter: &str) -> String {
    match topic::parse(filter, Usage::Subscribe) {
        Ok(TopicKind::Channel(channel)) => match resolve_ids(authorizer, channel).await {
            Some(resolved) => resolved.canonical(),
            None => filter.to_owned(),
        },
        Ok(TopicKind::Health { domain }) => match authorizer.resolve_domain(&domain).await {
            Some(id) => format!("hc/{id}"),
            None => filter.to_owned(),
        },
        _ => filter.to_owned(),
    }
}

/// The outcome of applying the topic rules to one topic or filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicDecision {
    /// Allowed; route under this topic or filter.
    Allow(String),
    /// Well-formed but not permitted for this client.
    Deny,
    /// Malformed by the SuperMQ rules.
    Invalid(TopicError),
}

/// Applies SPEC §2: channel topics (their routes resolved to ids) ask the authorizer, `hc/` topics are open to every session,
/// anything else needs a plain grant. Plain grants (`[[acl]]`, `[anonymous]`) are plain: they
/// never grant a channel topic, nor a plain topic or filter that reaches channel messages (`m/…`,
/// `#`, `+/…`; see [`topic::reaches_channels`]).
pub async fn authorize_topic(
    authorizer: &dyn Authorizer,
    who: &Identity,
    topic: &str,
    usage: Usage,
) -> TopicDecision {
    let action = Action::from(usage);
    match topic::parse(topic, usage) {
        Err(e) => TopicDecision::Invalid(e),
        Ok(TopicKind::Channel(channel)) => {
            // Routes become ids first: authorization, routing, the bridge and events see ids
            // only, so devices addressing a channel by route and by id meet.
            let Some(channel) = resolve_ids(authorizer, channel).await else {
                return TopicDecision::Deny;
            };
            if !who.anonymous
                && authorizer
                    .authorize_channel(who, &channel.domain, &channel.channel, action)
                    .await
            {
                TopicDecision::Allow(channel.canonical())
            } else {
                TopicDecision::Deny
            }
        }
        Ok(TopicKind::Health { domain }) => match authorizer.resolve_domain(&domain).await {
            Some(id) => TopicDecision::Allow(format!("hc/{id}")),
            None => TopicDecision::Deny,
        },
        Ok(TopicKind::Plain) => {
            if !topic::reaches_channels(topic) && authorizer.authorize_plain(who, topic, action) {
                TopicDecision::Allow(topic.to_owned())
            } else {
                TopicDecision::Deny
            }
        }
    }
}
