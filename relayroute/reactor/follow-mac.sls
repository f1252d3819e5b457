{#- relayroute's reactor for the relayroute beacon (README, "When a proxy's
    MAC changes"): a relay saw a proxy whose MAC relayroute discovers at a MAC
    its rules do not mark, and applies relayroute again, which looks the MAC
    up in its neighbour table. In the master's configuration:

      reactor:
        - 'salt/beacon/*/relayroute/mac':
          - salt://relayroute/reactor/follow-mac.sls

    Only the minion the event came from is targeted (the tag and the data
    must name the same minion), by its exact id, and only with relayroute's
    own state; 'queue' waits for a state run in progress instead of failing. -#}
{%- set minion = data.get('id', '') if data is mapping else '' %}
{%- if minion and tag.split('/')[2:3] == [minion] %}
relayroute-follow-mac:
  local.state.apply:
    - tgt: {{ minion | yaml_dquote }}
    - tgt_type: list
    - args:
      - mods: relayroute
      - queue: true
{%- endif %}
