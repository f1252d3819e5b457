# -*- coding: utf-8 -*-
# vim: ft=sls
# Removes exactly what relayroute added on a relay: its chains, rules and routes.

relayroute-relay-policy-routing-clean:
  relayroute.relay_absent: []
