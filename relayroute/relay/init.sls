# -*- coding: utf-8 -*-
# vim: ft=sls
# A relay: answer each connection through the gateway it came in by.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import relayroute with context %}
{%- set persist = relayroute.config.persist %}
{#- An import only where it is used: Jinja compiles an imported file on
    every run, and a re-apply needs no invalid-pillar macro. The boot unit,
    the watcher and their units are the relayroute state's boot files (with
    mechanism 'unit'; removed with another one, or the watcher switched off),
    written only once the apply succeeded. #}

{%- if relayroute.errors %}
{%-   from tplroot ~ "/invalid.jinja" import invalid with context %}
{{ invalid('relayroute-relay-invalid-pillar', relayroute.errors) }}
{%- else %}
{%-   if relayroute.unlisted_relay %}

# A warning, not a failure: a relay being brought up may get its reply
# routing before it is added to relays (and so to HAProxy's backends).
relayroute-relay-not-in-pillar:
  test.show_notification:
    - text: {{ ('WARNING: ' ~ relayroute.unlisted_relay) | yaml_dquote }}
{%-   endif %}

relayroute-relay-policy-routing:
  relayroute.relay_present:
    - lan_networks: {{ relayroute.relay.lan_networks | json }}
    - mark_mask: {{ relayroute.relay.mark_mask }}
    - proxies: {{ relayroute.relay.proxies | json }}
    - backend: {{ relayroute.config.backend }}
    - prefix: relayroute
{%-   if persist.enabled %}
    - persist: {{ persist | json }}
    - watcher: {{ relayroute.config.watch | json }}
{%-   endif %}
{%-   if relayroute.get('mine_used') %}

# This minion's record in the Salt mine (README, "The fleet from the mine"),
# refreshed when relayroute changed something here: a new relay is published by
# its first highstate. Nothing runs on a re-apply that changes nothing.
relayroute-relay-mine-update:
  module.run:
    - mine.update: []
    - onchanges:
      - relayroute: relayroute-relay-policy-routing
{%-   endif %}
{%-   for warning in relayroute.get('mine_warnings', []) %}

relayroute-relay-mine-warning-{{ loop.index }}:
  test.show_notification:
    - text: {{ ('WARNING: ' ~ warning) | yaml_dquote }}
{%-   endfor %}
{%- endif %}
