"""MQTT 5 features of the adapter with paho-mqtt: shared subscriptions, topic aliases, will delay.

Usage: mqtt5_paho.py PORT SCENARIO, SCENARIO one of shared, alias, will-delay, will-resumed,
will-expiry. The clients file is the tests' common one (c1, c2, c3 on d1/ch1). Exit 0 only if
the scenario behaved as MQTT 5 says; any failure prints why and exits 1.
"""
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

WAIT = 10.0
PORT = 0
TOPIC = "m/d1/c/ch1/paho5-" + uuid.uuid4().hex[:8]
# Notified on every message any client receives.
ARRIVALS = threading.Condition()


class Failed(Exception):
    pass


class Client:
    """One paho client on its own network thread, recording what it receives."""

    def __init__(self, client_id, user, version=mqtt.MQTTv5, clean=True, expiry=None,
                 alias_max=None, will=None):
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                             client_id=client_id, protocol=version)
        self.c.username_pw_set(user, "s" + user[1:])
        self.messages, self.lock = [], threading.Condition()
        self.connack, self.suback, self.disconnect_rc = None, None, None
        self.connected, self.subscribed = threading.Event(), threading.Event()
        self.closed = threading.Event()
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect
        if will is not None:
            topic, payload, delay = will
            props = Properties(PacketTypes.WILLMESSAGE)
            props.WillDelayInterval = delay
            self.c.will_set(topic, payload, qos=1, properties=props)
        props = None
        if version == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            if expiry is not None:
                props.SessionExpiryInterval = expiry
            if alias_max is not None:
                props.TopicAliasMaximum = alias_max
            self.c.connect("127.0.0.1", PORT, keepalive=30, clean_start=clean, properties=props)
        else:
            self.c.connect("127.0.0.1", PORT, keepalive=30)
        self.c.loop_start()
        if not self.connected.wait(WAIT):
            raise Failed(f"{client_id}: no CONNACK")
        if self.connack[0].is_failure:
            raise Failed(f"{client_id}: CONNACK {self.connack[0]}")

    def _on_connect(self, _c, _u, flags, reason_code, props):
        self.connack = (reason_code, props, flags)
        self.connected.set()

    def _on_subscribe(self, _c, _u, _mid, reason_codes, _props):
        self.suback = reason_codes
        self.subscribed.set()

    def _on_message(self, _c, _u, message):
        with self.lock:
            self.messages.append(message)
            self.lock.notify_all()
        with ARRIVALS:
            ARRIVALS.notify_all()

    def _on_disconnect(self, _c, _u, _flags, reason_code, _props):
        self.disconnect_rc = reason_code
        self.closed.set()

    def subscribe(self, topic, qos=1):
        self.subscribed.clear()
        self.c.subscribe(topic, qos=qos)
        if not self.subscribed.wait(WAIT):
            raise Failed(f"no SUBACK for {topic}")
        if any(rc.is_failure for rc in self.suback):
            raise Failed(f"SUBACK for {topic}: {self.suback}")

    def publish(self, topic, payload, qos=1, props=None):
        info = self.c.publish(topic, payload, qos=qos, properties=props)
        info.wait_for_publish(WAIT)
        if not info.is_published():
            raise Failed(f"PUBLISH {payload!r} to {topic!r} not acknowledged")

    def wait_messages(self, n, what):
        deadline = time.monotonic() + WAIT
        with self.lock:
            while len(self.messages) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failed(f"{what}: {len(self.messages)} of {n} messages arrived")
                self.lock.wait(left)
            return list(self.messages)

    def payloads(self):
        with self.lock:
            return [m.payload for m in self.messages]

    def close(self, with_will=False):
        rc = ReasonCode(PacketTypes.DISCONNECT, identifier=4) if with_will else None
        self.c.disconnect(reasoncode=rc)
        self.c.loop_stop()


def shared():
    """Three members (one MQTT 3.1.1) share the messages: each gets some, together all, once."""
    members = [Client("paho-sh-1", "c1"), Client("paho-sh-2", "c2"),
               Client("paho-sh-3", "c3", version=mqtt.MQTTv311)]
    available = getattr(members[0].connack[1], "SharedSubscriptionAvailable", None)
    if available != 1:
        raise Failed(f"CONNACK Shared Subscription Available = {available}")
    for m in members:
        m.subscribe("$share/paho/" + TOPIC)
    publisher = Client("paho-sh-pub", "c1")
    sent = [f"msg-{i}".encode() for i in range(30)]
    for payload in sent:
        publisher.publish(TOPIC, payload)
    with ARRIVALS:
        ARRIVALS.wait_for(lambda: sum(len(m.payloads()) for m in members) >= len(sent), WAIT)
    got = [m.payloads() for m in members]
    everything = sorted(p for g in got for p in g)
    if everything != sorted(sent):
        raise Failed(f"together the members got {len(everything)} of {len(sent)}: {got}")
    if any(not g for g in got):
        raise Failed(f"a member got nothing: {[len(g) for g in got]}")
    for m in members + [publisher]:
        m.close()


def alias():
    """Device-to-adapter aliases reach subscribers as full topics; a device that asks gets
    aliases; an unknown alias ends the connection with 0x94."""
    sub = Client("paho-al-sub", "c2", alias_max=5)
    advertised = getattr(sub.connack[1], "TopicAliasMaximum", None)
    if advertised != 64:
        raise Failed(f"CONNACK Topic Alias Maximum = {advertised}")
    sub.subscribe(TOPIC)
    plain = Client("paho-al-plain", "c3")
    plain.subscribe(TOPIC)
    pub = Client("paho-al-pub", "c1")
    props = Properties(PacketTypes.PUBLISH)
    props.TopicAlias = 3
    pub.publish(TOPIC, b"first", props=props)
    pub.publish("", b"second", props=props)
    msgs = plain.wait_messages(2, "subscriber without aliases")
    for m in msgs:
        if m.topic != TOPIC or getattr(m.properties, "TopicAlias", None) is not None:
            raise Failed(f"subscriber without aliases got topic {m.topic!r}, {m.properties}")
    first, second = sub.wait_messages(2, "subscriber with aliases")
    a1 = getattr(first.properties, "TopicAlias", None)
    a2 = getattr(second.properties, "TopicAlias", None)
    if first.topic != TOPIC or a1 is None or not 1 <= a1 <= 5:
        raise Failed(f"first delivery: topic {first.topic!r}, alias {a1}")
    if second.topic != "" or a2 != a1:
        raise Failed(f"second delivery: topic {second.topic!r}, alias {a2} (expected {a1})")
    unknown = Properties(PacketTypes.PUBLISH)
    unknown.TopicAlias = 9
    pub.c.publish("", b"lost", qos=1, properties=unknown)
    if not pub.closed.wait(WAIT):
        raise Failed("unknown alias: connection not closed")
    if pub.disconnect_rc is None or pub.disconnect_rc.value != 0x94:
        raise Failed(f"unknown alias: DISCONNECT {pub.disconnect_rc}")
    pub.c.loop_stop()
    for m in (sub, plain):
        m.close()


def will_topic():
    return TOPIC + "/will"


def watched_will(name, expiry, delay):
    """A watcher on the will topic, and a device (session expiry `expiry`, will delayed `delay`
    seconds) that has just disconnected with its will due, and when it did."""
    watcher = Client(f"paho-{name}-watch", "c2")
    watcher.subscribe(will_topic())
    dev = Client(f"paho-{name}-dev", "c1", expiry=expiry, will=(will_topic(), b"gone", delay))
    closed_at = time.monotonic()
    dev.close(with_will=True)
    return watcher, closed_at


def will_delay():
    """A will with a 2 s delay comes once, not before 2 s."""
    watcher, start = watched_will("wd", 60, 2)
    watcher.wait_messages(1, "delayed will")
    elapsed = time.monotonic() - start
    if elapsed < 1.9:
        raise Failed(f"will published after {elapsed:.2f} s, before its 2 s delay")
    # Anything published after the will reaches the watcher after any repeat of it would.
    watcher.publish(will_topic(), b"marker")
    watcher.wait_messages(2, "marker")
    if watcher.payloads() != [b"gone", b"marker"]:
        raise Failed(f"watcher got {watcher.payloads()}")
    watcher.close()


def will_resumed():
    """A session resumed within the delay sends no will."""
    watcher, _ = watched_will("wr", 60, 2)
    back = Client("paho-wr-dev", "c1", clean=False, expiry=60)
    if not back.connack[2].session_present:
        raise Failed("session not resumed")
    # Past the delay (the will would have come by now), then a marker.
    time.sleep(3)
    watcher.publish(will_topic(), b"marker")
    watcher.wait_messages(1, "marker")
    if watcher.payloads() != [b"marker"]:
        raise Failed(f"watcher got {watcher.payloads()}: the will was not cancelled")
    back.close()
    watcher.close()


def will_expiry():
    """A session expiring before the will delay publishes the will at expiry."""
    watcher, _ = watched_will("we", 1, 3600)
    watcher.wait_messages(1, "will at session expiry")
    if watcher.payloads() != [b"gone"]:
        raise Failed(f"watcher got {watcher.payloads()}")
    watcher.close()


SCENARIOS = {"shared": shared, "alias": alias, "will-delay": will_delay,
             "will-resumed": will_resumed, "will-expiry": will_expiry}


def main() -> int:
    global PORT
    PORT = int(sys.argv[1])
    try:
        SCENARIOS[sys.argv[2]]()
    except Failed as e:
        print(f"{sys.argv[2]}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
